"""Shared defaults: every number of the authors' Mask2Former recipe (REFERENCE.md).

Recipe files start from `get_base_config()` and change only what their recipe changes.
"""
import ml_collections
from ml_collections import config_dict


def resnet_backbone(depth: int = 50, norm: str = "frozen_bn") -> ml_collections.ConfigDict:
  """ResNet backbone; `norm` is 'frozen_bn' or 'sync_bn' (batch statistics over the global batch)."""
  blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
  if depth not in blocks:
    raise ValueError(f"ResNet depth must be 50 or 101, got {depth}")
  return ml_collections.ConfigDict(dict(
      name="resnet",
      stage_blocks=blocks[depth],
      stem_width=64,
      base_width=64,  # bottleneck width of res2; doubles per stage; outputs are 4x that
      norm=norm,
      norm_eps=1e-5,
      init_from=config_dict.placeholder(str),  # ImageNet weights (R-50.pkl, ...) for a fresh model
  ))


SWIN_SIZES = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12),
    "large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12),
}


def swin_backbone(size: str = "tiny") -> ml_collections.ConfigDict:
  """Swin backbone of the given size ('tiny', 'small', 'base', 'large')."""
  if size not in SWIN_SIZES:
    raise ValueError(f"Swin size must be one of {sorted(SWIN_SIZES)}, got {size!r}")
  return ml_collections.ConfigDict(dict(
      name="swin",
      patch_size=4,
      mlp_ratio=4.0,
      drop_path_rate=0.3,
      init_from=config_dict.placeholder(str),  # ImageNet weights (swin_*.pth, ...) for a fresh model
      **SWIN_SIZES[size],
  ))


def get_base_config() -> ml_collections.ConfigDict:
  """COCO panoptic, ResNet-50: the authors' defaults."""
  c = ml_collections.ConfigDict()

  # ---------------------------------------------------------------- model
  c.model = ml_collections.ConfigDict()
  c.model.backbone = resnet_backbone(50)
  c.model.num_classes = 133                    # K real classes; logits have K+1 (last = no object)
  c.model.pixel_mean = (123.675, 116.28, 103.53)
  c.model.pixel_std = (58.395, 57.12, 57.375)
  # pixel decoder (multi-scale deformable attention encoder + FPN step)
  c.model.pixel_decoder = ml_collections.ConfigDict(dict(
      conv_dim=256, mask_dim=256, num_layers=6, num_heads=8, num_points=4,
      ffn_dim=1024, num_groups=32,
      # Compute dtype: 'float32' (the authors disable autocast in the pixel decoder) or 'bfloat16'
      # (a memory lever: with model.dtype bfloat16 the whole model computes in bfloat16).
      dtype="float32",
  ))
  # masked-attention transformer decoder
  c.model.decoder = ml_collections.ConfigDict(dict(
      num_queries=100, hidden_dim=256, num_heads=8, ffn_dim=2048, num_layers=9,
  ))
  c.model.dtype = "float32"                    # compute dtype: 'float32' or 'bfloat16'
  # Rematerialisation (jax.checkpoint), a memory lever that changes neither parameters nor numbers:
  # 'none', 'all' or a comma-separated list of 'backbone' (the ResNet stem and each bottleneck /
  # each Swin block), 'pixel_decoder' (each deformable encoder layer and the FPN step), 'decoder'
  # (each masked-attention layer). Each such block keeps only its inputs for the backward pass,
  # which recomputes its activations: less memory for about one more forward pass of those stages.
  c.model.remat = "none"

  # ---------------------------------------------------------------- loss
  c.loss = ml_collections.ConfigDict(dict(
      class_weight=2.0, mask_weight=5.0, dice_weight=5.0, no_object_weight=0.1,
      num_points=12544, oversample_ratio=3.0, importance_sample_ratio=0.75,
      matcher="hungarian",                     # 'hungarian' (in-graph) or 'scipy' (host callback)
      # Target slots per image in one pass of the matching costs; a pass of the mask losses takes
      # (images per device) x this many of the device's matched (image, target) pairs, packed
      # across its images. With 1 the mask losses' cost follows the real targets exactly: on CPU
      # a Swin-T step (batch 2) took 5.26 s against 5.73 s with 8 for 5 targets per image, 5.55
      # against 6.13 s for 11 (benchmarks/step_ab.py).
      slots_per_pass=1,
      # How the most uncertain oversampled points are kept: 'top_k' (lax.top_k; accelerators) or
      # 'bisection' (the same points, counted by bisection; several times faster on CPU).
      uncertain_selection="top_k",
      # 'packed' (criterion.py: the matched pairs a pass at a time, gradients in the same pass) or
      # 'reference' (reference_criterion.py: the authors' formulation, all pairs at once, autodiff;
      # the same losses, more memory: docs/criterion.md).
      criterion="packed",
  ))

  # ---------------------------------------------------------------- optimiser
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-4, weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8,
      backbone_multiplier=0.1, clip_norm=0.01,
      schedule="step",                         # 'step' (COCO) or 'poly' (ADE20K, Cityscapes)
      step_fractions=(327_778 / 368_750, 355_092 / 368_750), step_factor=0.1, poly_power=0.9,
  ))

  # ---------------------------------------------------------------- data
  c.data = ml_collections.ConfigDict(dict(
      name="coco_panoptic",                    # a builder name of m2f_jax.data
      data_dir=config_dict.placeholder(str),   # tfds data_dir (None: tfds default)
      manual_dir=config_dict.placeholder(str), # official layout on disk
      augment="lsj",                           # 'lsj', 'ade20k', 'cityscapes', 'none'
      image_size=(1024, 1024),                 # training crop (H, W)
      min_scale=0.1, max_scale=2.0,            # LSJ scale range
      min_size_train=(),                       # ADE20K/Cityscapes shortest-side choices
      max_size_train=2048,
      min_size_test=800, max_size_test=1333,
      eval_pad_size=(1344, 1344),              # fixed padded eval shape (multiple of 32)
      max_targets=100,                         # M: target slots per image (-1 padded)
      segment_layers=1,                        # S: >1 keeps overlapping instances exact
      ignore_label=255,
      shuffle_buffer=1000,
      num_parallel_calls=-1,                   # -1: tf.data.AUTOTUNE
      prefetch=2,
      train_split="train", eval_split="validation",   # tfds split names
      crop_single_category_max_area=1.0,       # ADE20K/Cityscapes crop: max share of one class
      # the built-in synthetic set (cfg.data.name='synthetic'); one tfds directory per setting
      synthetic=ml_collections.ConfigDict(dict(
          train_size=2000, validation_size=200, image_size=128, seed=0)),
      # your own data set (cfg.data.name='custom'; see configs/custom.py, m2f_jax/data/custom_files.py)
      custom=ml_collections.ConfigDict(dict(
          format=config_dict.placeholder(str), classes=config_dict.placeholder(str),
          **{f"{split}_{key}": config_dict.placeholder(str) for split in ("train", "val")
             for key in ("images", "annotations", "panoptic_masks")})),
  ))

  # ---------------------------------------------------------------- evaluation / inference
  c.eval = ml_collections.ConfigDict(dict(
      tasks=("panoptic", "instance", "semantic"),
      object_mask_threshold=0.8, overlap_threshold=0.8, top_k=100,
      batch_size=8,                            # global
      tta_scales=(),                           # e.g. (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) for semantic TTA
      tta_flip=False,
      max_images=config_dict.placeholder(int),
      best_metric=config_dict.placeholder(str),  # WORKDIR/best/ by this (None: first task's headline)
  ))

  # ---------------------------------------------------------------- run
  c.total_steps = 368_750
  c.batch_size = 16                            # global, over all devices and hosts
  # Gradient accumulation: the step takes the global batch as this many micro-batches (each spread
  # over all devices) in a loop and makes one update, so memory is that of one micro-batch. The
  # update is the whole batch's (up to float rounding) but for sync BN statistics (per
  # micro-batch) and Swin's drop-path draws (per micro-batch); see m2f_jax/training/step.py.
  # batch_size must be a multiple of grad_accum_steps x device count.
  c.grad_accum_steps = 1
  c.checkpoint_every = 5000
  c.keep_checkpoints = 3
  c.log_every = 50
  c.eval_every = 5000                          # in-training evaluation (0: off), as the authors
  c.stop_check_every = 10                      # multi-host: steps between SIGTERM agreements
  c.seed = 0
  c.init_from = config_dict.placeholder(str)  # converted checkpoint dir to start from
  return c


def use_poly_recipe(c: ml_collections.ConfigDict, *, data_name: str, augment: str, num_classes: int,
                    total_steps: int, crop: tuple, short_side: int, max_size_train: int,
                    min_size_test: int, max_size_test: int) -> ml_collections.ConfigDict:
  """ADE20K and Cityscapes recipes: poly schedule, shortest side in short_side x {0.5, 0.6, ..., 2.0}, crop."""
  c.model.num_classes = num_classes
  c.optimizer.schedule = "poly"
  c.total_steps = total_steps
  c.data.name = data_name
  c.data.augment = augment
  c.data.image_size = crop
  c.data.min_size_train = tuple(int(short_side * x * 0.1) for x in range(5, 21))
  c.data.max_size_train = max_size_train
  c.data.min_size_test, c.data.max_size_test = min_size_test, max_size_test
  return c
