"""Published PAU initialisations, copied from the PAU code repositories: FOR COMPARISON ONLY.

`scripts/fit_rational.py` reports how far each published entry is from its target on the fit grid
and stores that beside its own fits; none is ever used as, or to start, a fit. Data, kept apart from
the fitting code so that each reads on its own.
"""

# --------------------------------------------------------------------------------------------------
# Published PAU initialisations - FOR COMPARISON ONLY, never used as (or to start) our fits.
# (name, version, m, n, source, numerator a_0..a_m, denominator b_1..b_n)
# The config files of ml-research/rational_activations define the versions exactly as above
# (rational/torch/rational_pytorch_functions.py: Rational_PYTORCH_A_F / Rational_PYTORCH_B_F).
# --------------------------------------------------------------------------------------------------
_RA_CFG = "github.com/ml-research/rational_activations rational/rationals_config.json"
_RA_PAU = "github.com/ml-research/rational_activations pau/paus_config.json"
_PAU_PY = "github.com/ml-research/pau pau/cuda/python_imp/Pade.py"
PUBLISHED = [
    # rationals_config.json "Rational_version_B5/4" (pau/paus_config.json "PAU_version_B5/4" has the
    # same numbers except for leaky_relu, listed separately below)
    (
        "leaky_relu",
        "B",
        5,
        4,
        _RA_CFG,
        (
            0.03355815733452378,
            0.5050059186781659,
            1.6534697310952233,
            2.0100501552600014,
            0.9319195586484518,
            0.15242646398275836,
        ),
        (4.812831860534153e-05, 3.9802479055059194, 1.5837587665720168e-05, 0.30183382839661377),
    ),
    (
        "tanh",
        "B",
        5,
        4,
        _RA_CFG,
        (
            2.1172949817857366e-09,
            0.9999942495075363,
            6.276332768876106e-07,
            0.10770864506559906,
            2.946556898117109e-08,
            0.000871124373591946,
        ),
        (6.376908337817277e-07, 0.44101418051922986, 2.2747661404467182e-07, 0.014581039909092108),
    ),
    (
        "sigmoid",
        "B",
        5,
        4,
        _RA_CFG,
        (
            0.5000000002774382,
            0.2500039727332485,
            0.05544474230118124,
            0.006888449237990345,
            0.00048491391666921244,
            1.5646015289718136e-05,
        ),
        (7.956371345839366e-06, 0.11088550952772189, 7.76547864226066e-07, 0.0009697684428133153),
    ),
    (
        "relu",
        "B",
        5,
        4,
        _RA_CFG,
        (
            0.033897129202224346,
            0.4999985439606278,
            1.6701363611130988,
            1.9901021632350815,
            0.9413089613384323,
            0.1509133373584318,
        ),
        (-2.1040152094202414e-05, 3.980247851167207, -3.166344237241501e-05, 0.30183382300945066),
    ),
    (
        "gelu",
        "B",
        5,
        4,
        _RA_CFG,
        (
            -0.0004221071456647063,
            0.49999955516606254,
            0.40270535451115536,
            0.07366976895222031,
            -0.012954788054484537,
            -0.0037414002583076983,
        ),
        (4.9585381197087913e-05, 0.1472977407631199, 1.1645825701440633e-05, -0.007483871514842074),
    ),
    (
        "silu",
        "B",
        5,
        4,
        _RA_CFG + ' ("swish")',
        (
            3.2597006782059475e-07,
            0.500000007624051,
            0.2500169540800127,
            0.05327519598927768,
            0.005804580590860159,
            0.00027529600705133663,
        ),
        (3.917294261258692e-05, 0.1065308384054887, 3.7991514117509955e-06, 0.0005503052126186067),
    ),
    # rationals_config.json "Rational_version_A5/4" (paus_config.json "PAU_version_A5/4": same except
    # for gelu, listed separately below)
    (
        "leaky_relu",
        "A",
        5,
        4,
        _RA_CFG,
        (
            0.029792778657264946,
            0.6183735264987601,
            2.323309062531321,
            3.051936237265109,
            1.4854203263828845,
            0.2510244961111299,
        ),
        (-1.1419548357285474, 4.393159974992486, 0.8714712309957245, 0.34719662339598834),
    ),
    (
        "tanh",
        "A",
        5,
        4,
        _RA_CFG,
        (
            -1.0804622559204184e-08,
            1.0003008043819048,
            -2.5878199375289335e-08,
            0.09632129918392647,
            3.4775841628196104e-09,
            0.0004255709234726337,
        ),
        (-0.0013027181209176277, 0.428349017422072, 1.4524304083061898e-09, 0.010796648111337176),
    ),
    (
        "sigmoid",
        "A",
        5,
        4,
        _RA_CFG,
        (
            0.4999992534599381,
            0.25002157564685185,
            0.14061924500301096,
            0.049420492431596394,
            0.00876714851885483,
            0.0006442412789159799,
        ),
        (2.1694506382753683e-09, 0.28122766100417684, 1.0123620714203357e-05, 0.017531988049946),
    ),
    (
        "relu",
        "A",
        5,
        4,
        _RA_CFG,
        (
            0.029963801610813613,
            0.6168978366891341,
            2.37534759733888,
            3.0659900472408443,
            1.5246831881677423,
            0.2528070864040542,
        ),
        (-1.191550121923625, 4.4080487697236626, 0.9110357113686055, 0.34884977946384615),
    ),
    (
        "gelu",
        "A",
        5,
        4,
        _RA_CFG,
        (
            -0.0012423594497499122,
            0.5080497063245629,
            0.41586363182937475,
            0.13022718688035761,
            0.024355900098993424,
            0.00290283948155535,
        ),
        (-0.06675015696494944, 0.17927646217001553, 0.03746682605496631, 1.6561610853276082e-10),
    ),
    (
        "silu",
        "A",
        5,
        4,
        _RA_CFG + ' ("swish")',
        (
            3.054879741161051e-07,
            0.5000007853744493,
            0.24999783422824703,
            0.05326628273219478,
            0.005803034571292244,
            0.0002751961022402342,
        ),
        (-4.111554955950634e-06, 0.10652899335007572, -1.2690007399796238e-06, 0.0005502331264140556),
    ),
    # rationals_config.json "Rational_version_A3/2"
    (
        "leaky_relu",
        "A",
        3,
        2,
        _RA_CFG,
        (0.11440311001189646, 0.5891610756805713, 0.5423986871505561, 0.13286948390430828),
        (0.2074994452826854, 0.20726656124953777),
    ),
    # pau/paus_config.json entries that differ from rationals_config.json
    (
        "leaky_relu",
        "B",
        5,
        4,
        _RA_PAU,
        (
            0.03355815890668059,
            0.5049940948281444,
            1.6534163637528791,
            2.0099850112036783,
            0.9318900490866645,
            0.1524224383838956,
        ),
        (-5.748546580824416e-05, 3.9802477853818083, -4.2529808614931225e-05, 0.3018338162009311),
    ),
    (
        "gelu",
        "A",
        5,
        4,
        _RA_PAU,
        (
            -0.0011405929606361626,
            0.5040717642397966,
            0.4117606717399584,
            0.12113679843904002,
            0.018615678966175966,
            0.0018788058604368117,
        ),
        (-0.038669759584149345, 0.1923668340158292, 0.02378313688354509, 2.7448616774554535e-10),
    ),
    # original PAU code (get_constants_for_inits); its Python reference implementation uses the
    # version-"A" formula (|b_k| |x|^k)
    (
        "leaky_relu",
        "A",
        5,
        4,
        _PAU_PY + ' "pade_optimized_leakyrelu"',
        (3.35583603e-02, 5.05000375e-01, 1.65343934e00, 2.01001052e00, 9.31901999e-01, 1.52424124e-01),
        (3.30847488e-06, 3.98021568e00, 5.12471206e-07, 3.01830109e-01),
    ),
    (
        "sigmoid",
        "A",
        3,
        2,
        _PAU_PY + ' "pade_sigmoid_3" (Taylor-Pade approximant)',
        (1 / 2, 1 / 4, 1 / 20, 1 / 240),
        (0.0, 1 / 10),
    ),
    (
        "sigmoid",
        "A",
        5,
        2,
        _PAU_PY + ' "pade_sigmoid_5" (Taylor-Pade approximant)',
        (1 / 2, 1 / 4, 17 / 336, 1 / 224, 0.0, -1 / 40320),
        (0.0, 1 / 10),
    ),
]

# Published entries left out of the comparison, and why.
PUBLISHED_NOT_COMPARED = [
    (
        "leaky_relu_0.1 (B5/4, A5/4, A3/2, B3/2)",
        _RA_CFG,
        "negative slope 0.1, not our leaky_relu (slope 0.01)",
    ),
    (
        '"pade_optimized_leakyrelu2" (5,4)',
        _PAU_PY,
        "matches none of the targets on [-3, 3] (max error ~2.5 against leaky_relu); rounded to 4 digits",
    ),
    ('"pade_optimized_avg", "pade_softplus", "pade_optmized"', _PAU_PY, "not one of our targets"),
    (
        "versions C, D, N",
        _RA_CFG + ", " + _RA_PAU,
        "other denominators (C: 0.1 + |...|, N: unknown); D is version B with training noise and "
        "repeats the B numbers",
    ),
    ("identity (all versions)", _RA_CFG, "identity is exact here (a_1 = 1, rest 0)"),
]
