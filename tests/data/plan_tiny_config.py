"""configs/synthetic.py shrunk for a plan-tool compile in seconds (tests/test_plan.py): 64x64."""
from configs import synthetic


def get_config():
  c = synthetic.get_config()
  c.model.num_classes = 3
  c.model.pixel_decoder.update(conv_dim=32, mask_dim=32, num_layers=1, num_heads=2, ffn_dim=64,
                               num_groups=4)
  c.model.decoder.update(num_queries=6, hidden_dim=32, num_heads=2, ffn_dim=64, num_layers=1)
  c.loss.num_points = 64
  c.data.image_size = (64, 64)
  c.data.eval_pad_size = (64, 64)
  c.data.max_targets = 4
  c.eval.batch_size = 2
  return c
