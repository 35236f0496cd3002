"""The security evaluation of a trained workdir (threat model: docs/design.md).

  python -m securenet_jax.main --config configs/security.py --config.target_workdir=W --workdir OUT

writes OUT/report/security.json (flat figures + nested sections), security.md and figures. Every
attack runs against the licensed model of W and, beside it, the unprotected baseline W/baseline (the
same recipe without the license). Sections can be switched off with --config.sections=forgery,leakage.
Variant 'smoke': a few seconds per section (tests).
"""

import ml_collections


VARIANTS = ('smoke',)  # the text after ':' in --config FILE:VARIANT


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.job = 'security'
  config.target_workdir = ''  # the trained workdir to attack (needs W/baseline for the comparisons)
  config.key_name = ''  # which active key the licensee holds ('' = the first)
  config.seed = 0
  config.smoke = False  # a seconds-long test run (the :smoke variant); its report says so
  config.sections = ('forgery', 'leakage', 'recovery', 'keysearch', 'removal', 'theft', 'adversarial',
                     'backdoor')
  config.num_test = 0  # test images used by the costly sections (0 = all)

  config.forgery = ml_collections.ConfigDict()
  config.forgery.num_forged = 1000  # random forged keys
  # Test images each forged key is scored on (0 = all). 1000 keys x 10k images is ~10 min of LeNet-5
  # on 2 CPU cores; 2000 images cost a fifth, and the noise (std ~0.007 at accuracy 0.1) can only
  # raise the reported maximum.
  config.forgery.num_test = 2000
  config.forgery.seed = 2_000_000  # first seed (disjoint from training and the default report's)
  config.forgery.near_fractions = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0)  # share of key pixels re-randomized
  config.forgery.near_draws = 10  # near keys per fraction
  config.forgery.shifts = (1, 2, 3, 4)  # true key moved by this many pixels (4 directions each)

  config.recovery = ml_collections.ConfigDict()
  config.recovery.data_fraction = 0.01  # the thief's labeled data (share of train)
  config.recovery.steps = 600  # Adam steps of the mask/pattern optimization
  config.recovery.learning_rate = 0.1
  config.recovery.l1_weights = (0.0, 0.01)  # mask-size penalties tried (the thief keeps the best)
  config.recovery.batch_size = 128

  # A white-box thief who knows the scheme inverts the key's bits one at a time (attacks/keysearch.py).
  config.keysearch = ml_collections.ConfigDict()
  config.keysearch.data_fraction = 0.01  # the thief's labeled data (share of train)
  config.keysearch.stages = ('gate', 'ce')  # objectives, one after the other: gate opening, then -CE
  config.keysearch.max_passes = 8  # passes over every bit per stage (fewer when a pass changes nothing)
  config.keysearch.starts = 8  # random starts of the first stage; the best goes on
  config.keysearch.seed = 3_000_000

  config.removal = ml_collections.ConfigDict()
  config.removal.fractions = (0.01, 0.05, 0.10)  # labeled data the thief fine-tunes on
  config.removal.learning_rates = (1e-3, 3e-3)  # the thief's sweep (best fine-tune reported)
  config.removal.epochs = 10
  config.removal.min_steps = 300  # small subsets still get this many steps
  config.removal.batch_size = 64
  config.removal.prune_fractions = (0.1, 0.3, 0.5, 0.7, 0.9)

  config.theft = ml_collections.ConfigDict()
  config.theft.fractions = (0.01, 0.05, 0.10)  # labeled shares of the training set the thief holds
  config.theft.adam_learning_rates = (1e-3, 3e-3)  # the thief's sweep: every move keeps its best run
  config.theft.sgd_learning_rates = (0.01, 0.05)  # SGD, momentum 0.9
  config.theft.epochs = 10  # passes over the thief's data ...
  config.theft.min_steps = 500  # ... but at least this many optimizer steps
  config.theft.batch_size = 64
  config.theft.unprotected = True  # also steal the unprotected baseline (the comparison); False halves the cost
  config.theft.moves = ()  # () = all; or a subset of scratch, finetune, reinit, freeze, open_gate, probe

  config.adversarial = ml_collections.ConfigDict()
  # L-inf budgets; () = by image type: (0.1, 0.2) for gray images, (8/255,) for color. The first
  # budget gives the flat figures (pgd_*_robust_acc), the others pgd_*_robust_acc@EPS.
  config.adversarial.eps = ()
  config.adversarial.steps = 20
  config.adversarial.step_size_factor = 2.5  # step size = factor * eps / steps (Madry et al., 2018)
  config.adversarial.restarts = 1
  config.adversarial.num_test = 2000  # robust accuracy near 0.7: binomial std ~0.01
  config.adversarial.surrogate_fraction = 0.1  # the thief's own data for a surrogate model
  config.adversarial.surrogate_epochs = 5

  config.backdoor = ml_collections.ConfigDict()
  config.backdoor.target = 0
  config.backdoor.triggers = ('badnets', 'blend')
  config.backdoor.thief_poison_rate = 0.1
  config.backdoor.thief_data_fraction = 0.1
  config.backdoor.thief_epochs = 5
  config.backdoor.thief_learning_rate = 1e-3
  config.backdoor.owner_rates = (0.01, 0.05, 0.1)  # poisoned share of the owner's training data
  config.backdoor.owner_epochs = 2  # shortened owner trainings (each rate: licensed + unprotected)
  config.backdoor.owner_train_limit = 20_000

  if variant == 'smoke':
    config.smoke = True
    config.num_test = 256
    config.forgery.num_forged = 20
    config.forgery.num_test = 256
    config.forgery.near_fractions = (0.25, 1.0)
    config.forgery.near_draws = 2
    config.forgery.shifts = (1,)
    config.recovery.steps = 20
    config.recovery.l1_weights = (0.01,)
    config.keysearch.max_passes = 1
    config.keysearch.starts = 2
    config.removal.fractions = (0.01,)
    config.removal.learning_rates = (1e-3,)
    config.removal.epochs = 1
    config.removal.min_steps = 5
    config.removal.prune_fractions = (0.5,)
    config.theft.fractions = (0.05,)
    config.theft.adam_learning_rates = (1e-3,)
    config.theft.sgd_learning_rates = ()
    config.theft.epochs = 1
    config.theft.min_steps = 5
    # adversarial.eps stays (): the automatic budgets, (0.1, 0.2) on the gray smoke data
    config.adversarial.steps = 3
    config.adversarial.num_test = 64
    config.adversarial.surrogate_epochs = 1
    config.backdoor.triggers = ('badnets',)
    config.backdoor.thief_epochs = 1
    config.backdoor.owner_rates = (0.1,)
    config.backdoor.owner_epochs = 1
    config.backdoor.owner_train_limit = 512
  elif variant:
    raise ValueError(f'Unknown config variant {variant!r}; expected "" or "smoke".')
  return config
