"""The built-in default: a small Mask2Former on the built-in synthetic panoptic set.

Runs end to end on a 2-core CPU in minutes (`make demo`). The architecture is the authors' with
smaller widths and depths; the recipe is the authors' except for the schedule (length, learning
rate, poly decay), the number of queries and a narrower scale range. docs/demo_tuning.md tells how
the numbers were chosen.
"""

from configs import base


def get_config():
  c = base.get_base_config()
  c.model.backbone = base.resnet_backbone(50)
  c.model.backbone.update(stage_blocks=(1, 1, 1, 1), stem_width=16, base_width=16, norm="sync_bn")
  c.model.num_classes = 8
  c.model.pixel_decoder.update(conv_dim=64, mask_dim=64, num_layers=2, num_heads=4, ffn_dim=256,
                               num_groups=8)
  # A scene has at most 8 segments (3 stuff regions, 5 things): 16 queries leave room to spare.
  c.model.decoder.update(num_queries=16, hidden_dim=64, num_heads=4, ffn_dim=256, num_layers=3)
  c.loss.num_points = 1024

  # From scratch: a high rate decaying to 0 (poly) over 1000 steps; PQ 71.9 (things 57.8), AP 43.0,
  # mIoU 85.4 in about 6 minutes on 2 idle CPU cores (docs/demo_tuning.md, docs/demo_log.txt).
  c.optimizer.learning_rate = 2e-3
  c.optimizer.schedule = "poly"
  c.optimizer.backbone_multiplier = 1.0         # the tiny backbone starts from scratch
  c.optimizer.clip_norm = 0.1

  c.data.name = "synthetic"
  c.data.synthetic.update(train_size=2000, validation_size=200, image_size=128, seed=0)
  c.data.augment = "lsj"
  c.data.image_size = (128, 128)
  c.data.min_scale, c.data.max_scale = 0.8, 1.25  # near the evaluation scale: small things stay visible
  c.data.min_size_test, c.data.max_size_test = 128, 128
  c.data.eval_pad_size = (128, 128)
  c.data.max_targets = 16
  c.data.shuffle_buffer = 256

  c.eval.batch_size = 16
  c.total_steps = 1000                          # `make demo` in under 10 minutes on 2 idle CPU cores
  c.batch_size = 8
  c.checkpoint_every = 250
  c.log_every = 50
  c.eval_every = 250
  return c
