"""Your own data set: fine-tune (or train) Mask2Former R50 on COCO-format or semantic PNG files.

  python train.py --config configs/custom.py --workdir runs/mine \
      --config.init_from=ckpt/coco_r50 \
      --config.data.custom.format=coco_panoptic \
      --config.data.custom.train_images=DATA/train --config.data.custom.train_annotations=DATA/train.json \
      --config.data.custom.train_panoptic_masks=DATA/train_png \
      --config.data.custom.val_images=DATA/val --config.data.custom.val_annotations=DATA/val.json \
      --config.data.custom.val_panoptic_masks=DATA/val_png

Formats and keys: m2f_jax/data/custom_files.py. `model.num_classes` is left unset and follows the
data's categories; a value set on the command line must agree with them. The architecture is the
authors' COCO R50 (100 queries), so `init_from` can be their converted COCO checkpoint: its class
head (133 + 1 logits) is re-initialised for your classes, everything else starts from COCO.
"""
from ml_collections import config_dict

from configs import base


def get_config():
  c = base.get_base_config()
  c.model.num_classes = config_dict.placeholder(int)   # None: the number of categories in the data
  c.data.name = "custom"
  c.data.custom.format = "coco_panoptic"
  # A fine-tuning schedule (not from the paper): 20k steps, lr x0.1 at the same fractions as COCO.
  c.total_steps = 20_000
  c.checkpoint_every = 2000
  return c
