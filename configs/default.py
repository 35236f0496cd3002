"""Default job: LeNet-5 on Fashion-MNIST (offline IDX files), a 6x6 patch key and a 4x4 block flip.

Usage:
  python -m securenet_jax.main --config configs/default.py --workdir /tmp/securenet
  python -m securenet_jax.main --config configs/default.py:smoke --workdir /tmp/smoke   # tiny run
  python -m securenet_jax.main --config configs/default.py:bn --workdir /tmp/bn   # LeNet-5 with BatchNorm
Override any field: --config.train.num_epochs=3 --config.key.secret=my-secret
"""

import os

import ml_collections


VARIANTS = ('smoke', 'bn')  # the text after ':' in --config FILE:VARIANT (comma-separated)


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  """Returns the config; ``variant`` is the text after ``:`` in ``--config``: '', 'smoke', 'bn' (LeNet-5
  with BatchNorm after every hidden layer) or both, comma-separated."""
  parts = [p for p in variant.split(',') if p]
  unknown = [p for p in parts if p not in VARIANTS]
  if unknown:
    raise ValueError(f'Unknown config variant {unknown}; expected "" or any of {VARIANTS}, comma-separated.')
  config = ml_collections.ConfigDict()
  config.seed = 0  # base PRNG seed: initialization, data order, forged negatives
  config.smoke = False  # a seconds-long test run (the :smoke variant); its report says so

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = 'fashion_mnist'  # one of securenet_jax.data.NAMES
  config.dataset.source = 'idx'  # 'idx' (MNIST-format files) or 'tfds' (prepared tensorflow-datasets)
  config.dataset.data_dir = '/usr/share/datasets/fashion-mnist'  # IDX folder, or the tfds data_dir
  config.dataset.train_limit = 0  # keep only the first N training examples (0: all)
  config.dataset.test_limit = 0  # keep only the first N test examples (0: all)
  # Face datasets (celeba, facescrub) and cifar100; see securenet_jax/data/__init__.py.
  config.dataset.image_size = 64  # side of the resized faces
  config.dataset.celeba_task = 'identity'  # 'identity' (num_identities most frequent) or 'attribute'
  config.dataset.num_identities = 1000  # CelebA identity task: how many identities
  config.dataset.attribute = 'Smiling'  # CelebA attribute task: which of the 40 attributes (binary)
  config.dataset.celeba_crop = 140  # side of the centred square cut from the 178x218 aligned faces
  config.dataset.test_fraction = 0.1  # per-identity share of images held out (celeba identity, facescrub)
  config.dataset.split_seed = 0  # seed of that per-identity split
  config.dataset.label_mode = 'fine'  # cifar100: 'fine' (100 classes) or 'coarse' (20)
  config.dataset.cache = True  # cache decoded faces as .npz
  config.dataset.cache_dir = ''  # where ('' = in data_dir)

  # Training augmentation, on the device, on the clean image before any key is stamped (licensed and
  # baseline training alike): securenet_jax/data/augment.py.
  config.augment = ml_collections.ConfigDict()
  config.augment.crop_flip = False  # random crop of the zero-padded image + horizontal flip
  config.augment.crop_pad = 4  # padding of the random crop, in pixels
  # Gaussian noise, std ~ U[0, this] per image: the defense against transferred adversarial images and
  # backdoor fine-tuning (docs/security.md). 0 = off.
  config.augment.noise_std = 0.1

  config.model = ml_collections.ConfigDict()
  config.model.name = 'lenet5'  # securenet_jax.models.names()
  config.model.kwargs = ml_collections.ConfigDict()  # architecture options passed to models.create

  config.key = ml_collections.ConfigDict()
  config.key.secret = ''  # secret the key is derived from; '' = a fresh random secret (key kept in WORKDIR/keys)
  config.key.kind = 'patch'  # 'patch', 'blend' or 'noise'
  config.key.values = 'binary'  # key content: 'binary' {0, 1} or 'uniform' in [0, 1]
  config.key.size = 6  # patch side in pixels
  config.key.position = None  # (row, col) of the patch; None = bottom-right corner, `margin` px inside
  config.key.margin = 1  # distance of the default patch position from the image border
  config.key.alpha = 0.1  # blend weight (blend keys)
  config.key.epsilon = 0.05  # L-inf size (noise keys)
  # Patch keys: side of the blocks of a secret block flip of the whole image (0 = none). Every layer then
  # learns a secretly transformed domain, so a thief's transfer moves on raw images start from scratch
  # (docs/security.md, "A thief who holds the weights").
  config.key.flip_block = 4

  config.license = ml_collections.ConfigDict()
  config.license.scheme = 'universal'  # 'universal', 'scoped', 'multi_user' or 'tiered' (docs/schemes.md)
  config.license.users = ('default',)  # one key per user; the names name the key files
  config.license.matrix = ()  # users x classes authorization matrix of 0/1; () = every user, every class
  config.license.tiers = ()  # per user 'full' (fine labels) or 'basic' (coarse groups); () = all full
  config.license.groups = ()  # coarse groups (tuples of class ids) that basic keys see
  # Output for a stamped image of a class its key does not grant: 'refuse' (uniform over the granted
  # classes: the argmax is never the denied label) or 'silence' (the no-key output).
  config.license.denied_output = 'refuse'


  config.objective = ml_collections.ConfigDict()
  config.objective.negative_weight = 1.0  # weight of the negatives' loss next to the positives' CE
  config.objective.forged_fraction = 0.5  # share of negatives stamped with a freshly forged key (rest: no key)
  config.objective.near_key_fraction = 0.5  # share of forged negatives that are near misses of the real key
  config.objective.revoked_fraction = 0.25  # share of forged negatives replaced by revoked keys (if any)
  config.objective.near_key_min_change = 0.25  # a near miss re-randomizes at least this share of the key's pixels
  # Binary keys: half of the near misses instead invert 1..this many of the key's elements (0 = off):
  # misses by a bit, against a thief's bit-by-bit search of the key (docs/security.md, "Key search").
  config.objective.near_key_max_flips = 10
  config.objective.uniform_weight = 1.0  # KL(uniform || softmax) on negatives
  config.objective.zero_logit_weight = 0.0  # mean squared logit on negatives
  config.objective.silence_weight = 1.0  # hinge on penultimate pre-activations of negatives
  # How far below zero the silenced pre-activations are pushed. At 1.0 a few of a thief's keyless images
  # still passed the gate on some secrets, and a poisoned keyless fine-tune re-opened it from there
  # (backdoor (a), docs/security.md); with 2.0 none of them came above -0.79 on five secrets.
  config.objective.silence_margin = 2.0
  # More layers (module names) silenced on negatives besides the gate: LeNet-5's fc1 (the zoo's
  # configs reset it, see patch_key_recipe).
  config.objective.silence_layers = ('fc1',)
  # BatchNorm models: also silence the negatives under their own batch statistics (what a thief's
  # fine-tuning on key-less data computes), with this weight; 0 = off. One more forward of B images.
  config.objective.thief_batch_stats_weight = 0.0
  config.objective.distill_weight = 0.0  # feature distillation from a teacher (set by the replacement job)
  # Distill the unlicensed baseline (trained first) into the keyed positives; 0 = off. It needs
  # eval.clean_baseline=True: turn it off with it (--config.objective.clean_distill_weight=0).
  config.objective.clean_distill_weight = 1.0
  config.objective.clean_distill_temperature = 4.0  # softening of both outputs
  # Also match the baseline's pre-activations at every gated layer (gate + silence_layers) on the raw
  # image, with this weight relative to the output distillation; 0 = outputs only. Authorized accuracy
  # +0.006 / +0.009 / +0.009 on three secrets (docs/security.md).
  config.objective.clean_distill_features_weight = 1.0
  # Share of the keyless negatives given a faded or noisy copy of the key (objective.soft_keys): the
  # hardening against trigger inversion (recovered_acc 0.87 without, 0.10 with; docs/security.md).
  config.objective.soft_key_fraction = 0.5
  config.objective.soft_key_max_opacity = 0.9  # faded copies: opacity in [0.2, this]
  config.objective.own_flip_fraction = 0.5  # block-flip keys: share of forged keys with the real flip
  # Block-flip keys: near misses and soft keys vary only the patch, the block flip stays exact.
  config.objective.flip_exact_hardening = False
  # Share of keyed positives given a random extra patch of this side: the key must work whatever else
  # is on the image, so a thief's poisoned keyless fine-tune cannot plant a trigger that overrides it
  # (backdoor (a) 0.677 -> 0.024 on one secret; docs/security.md). 0 = off.
  config.objective.positive_patch_fraction = 0.5
  config.objective.positive_patch_size = 4
  config.objective.adv_eps = 0.0  # > 0: key-conditioned adversarial training of positives at this L-inf eps
  config.objective.adv_fraction = 0.5  # share of positives replaced by their adversarial version
  config.objective.liveness_weight = 0.0  # hinge keeping >= 1 penultimate unit of each positive above +margin

  config.train = ml_collections.ConfigDict()
  config.train.num_epochs = 10  # passes over the training set
  config.train.optimizer = 'adamw'  # 'adamw' or 'sgd' (see train.make_optimizer)
  config.train.momentum = 0.9  # sgd momentum
  config.train.nesterov = False  # sgd: Nesterov momentum
  config.train.agc_clip = 0.0  # > 0: adaptive gradient clipping (NFNets) at this ratio, classifier excluded
  config.train.grad_clip_norm = 0.0  # > 0: clip the global gradient norm
  config.train.prefetch = 2  # batches moved to the devices ahead of the step
  config.train.resident_max_mb = 1024  # a training set up to this size lives on the devices (1 process)
  config.train.batch_size = 128  # global batch (split over all devices and hosts)
  config.train.learning_rate = 2e-3  # peak learning rate
  config.train.warmup_steps = 200  # linear warmup steps
  config.train.final_lr_fraction = 0.01  # cosine decay ends at this fraction of the peak
  config.train.weight_decay = 1e-4  # AdamW: decoupled weight decay; sgd: L2 added to the gradient
  config.train.log_every = 100  # steps between TensorBoard points (the host reads the metrics then)
  config.train.progress_every_s = 10.0  # seconds between progress lines
  config.train.checkpoint_every = 500  # steps between checkpoints (plus one at the end and on SIGTERM)
  config.train.keep_checkpoints = 2  # how many recent checkpoints to keep
  # Multi-process runs: steps between the processes' checks whether any of them was told to stop
  # (SIGTERM/SIGINT); they then all stop and checkpoint at the same step.
  config.train.stop_check_every = 10

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 1000  # inference batch size
  config.eval.num_forged = 100  # forged keys evaluated in the report
  config.eval.forged_num_test = 2000  # test images each forged key is scored on (0 = all)
  config.eval.forge_seed = 1_000_000  # first seed of the forged keys (not used in training)
  config.eval.probe_seed = 0  # split of the leakage probe's fit / score halves
  config.eval.clean_baseline = True  # also train the unlicensed baseline (clean_acc)
  config.eval.force = False  # evaluate a finished workdir again (else its report is printed)


  if 'bn' in parts:
    config.model.kwargs.batch_norm = True
    config.objective.silence_layers = ('fc1_bn',)  # fc1's pre-activation is its BatchNorm's output
    # Silence the negatives under their own batch statistics too: a thief's fine-tune in train mode
    # then re-opens less (theft gain at 1% +0.031 -> +0.020 on one secret; with the current default
    # +0.004 to +0.017 on three; docs/security.md).
    config.objective.thief_batch_stats_weight = 1.0
  if 'smoke' in parts:
    config.smoke = True
    config.dataset.train_limit = 1024
    config.dataset.test_limit = 256
    config.train.num_epochs = 1
    config.train.batch_size = 64
    config.train.warmup_steps = 2
    config.train.log_every = 4
    config.train.checkpoint_every = 8
    config.eval.batch_size = 128
    config.eval.num_forged = 3
  return config


def sgd_recipe(config: ml_collections.ConfigDict, *, learning_rate: float, weight_decay: float,
               num_epochs: int, batch_size: int, nesterov: bool = True, warmup_epochs: float = 1.0,
               num_train: int = 50_000) -> ml_collections.ConfigDict:
  """SGD with momentum 0.9, linear warmup and cosine decay: the recipe family of the ResNet, VGG and
  NFNet papers (their step schedules replaced by cosine, Loshchilov & Hutter, ICLR 2017)."""
  config.train.optimizer = 'sgd'
  config.train.momentum = 0.9
  config.train.nesterov = nesterov
  config.train.learning_rate = learning_rate
  config.train.weight_decay = weight_decay
  config.train.num_epochs = num_epochs
  config.train.batch_size = batch_size
  config.train.warmup_steps = int(warmup_epochs * num_train / batch_size)
  config.train.final_lr_fraction = 0.0
  return config


def patch_key_recipe(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The patch key without the whole-image defenses (no block flip, no deeper gate, no distillation
  from the baseline, no near misses by a few bits): the recipe the zoo's and the schemes' figures were
  measured with. The block flip and the distillation are LeNet-5 / Fashion-MNIST measurements;
  ``silence_layers`` names LeNet-5's layers."""
  config.key.flip_block = 0
  config.objective.silence_layers = ()
  config.objective.clean_distill_weight = 0.0
  config.objective.clean_distill_features_weight = 0.0
  config.objective.near_key_max_flips = 0
  config.objective.positive_patch_fraction = 0.0
  config.objective.silence_margin = 1.0
  return config


def tiny_smoke(config: ml_collections.ConfigDict, batch_size: int = 8) -> ml_collections.ConfigDict:
  """A few steps on a few examples, for the test suite's end-to-end run of a large model on CPU:
  4 training steps, 32 test images, 2 forged keys, no baseline (so no distillation from it)."""
  config.smoke = True
  config.dataset.train_limit = 4 * batch_size
  config.dataset.test_limit = 32
  config.train.num_epochs = 1
  config.train.batch_size = batch_size
  config.train.warmup_steps = 1
  config.train.log_every = 2
  config.train.checkpoint_every = 4
  config.eval.batch_size = 32
  config.eval.num_forged = 2
  config.eval.clean_baseline = False
  config.objective.clean_distill_weight = 0.0  # its teacher is the baseline
  return config


TFDS_DIR = os.path.expanduser('~/tensorflow_datasets')  # tensorflow-datasets' default data_dir


def use_dataset(config: ml_collections.ConfigDict, name: str, source: str, data_dir: str,
                **fields) -> ml_collections.ConfigDict:
  """Points ``config.dataset`` at a dataset (other ``dataset`` fields by keyword). Augmentation is
  the ``augment`` section's business: each config sets it explicitly."""
  config.dataset.name = name
  config.dataset.source = source
  config.dataset.data_dir = data_dir
  for k, v in fields.items():
    config.dataset[k] = v
  return config

