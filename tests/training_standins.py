"""Stand-ins honouring the model / loss / data contracts, for training tests (temporary)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m2f_jax.models.backbone import build_backbone


class StandInModel(nn.Module):
  cfg: object

  @nn.compact
  def __call__(self, images, train=False):
    cfg = self.cfg
    mean = jnp.asarray(cfg.model.pixel_mean, jnp.float32)
    std = jnp.asarray(cfg.model.pixel_std, jnp.float32)
    x = (images.astype(jnp.float32) - mean) / std
    feats = build_backbone(cfg.model.backbone, cfg.model.dtype)(x, train=train)
    q, k = cfg.model.decoder.num_queries, cfg.model.num_classes
    d = 16
    res2 = nn.Dense(d, name="pixel_decoder")(feats["res2"].astype(jnp.float32))
    query = self.param("decoder_query_feat", nn.initializers.normal(1.0), (q, d))
    pooled = jnp.mean(feats["res5"].astype(jnp.float32), axis=(1, 2))
    h = query[None] + nn.Dense(d, name="decoder_in")(pooled)[:, None]
    h = nn.LayerNorm(name="decoder_norm")(h)
    cls = nn.Dense(k + 1, name="decoder_cls")(h)
    masks = jnp.einsum("bqd,bhwd->bqhw", h, res2)
    return {"class_logits": jnp.stack([cls, 0.5 * cls]),
            "mask_logits": jnp.stack([masks, 0.5 * masks])}


def standin_loss(outputs, batch, rng, num_classes):
  del rng
  labels = batch["labels"]
  m = labels.shape[1]
  cls = outputs["class_logits"][:, :, :m]
  target = jnp.where(labels >= 0, labels, num_classes)
  ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(cls), target[None, ..., None], -1))
  seg = batch["segment_ids"][:, :, ::4, ::4]
  ids = jnp.arange(1, m + 1)[None, :, None, None, None]
  gt = jnp.any(seg[:, None] == ids, axis=2).astype(jnp.float32)  # [B, M, h, w]
  logits = outputs["mask_logits"][:, :, :m]
  bce = jnp.mean(optax_sigmoid_bce(logits, gt[None]), axis=(-1, -2))
  valid = (labels >= 0).astype(jnp.float32)[None]
  bce = jnp.sum(bce * valid) / jnp.maximum(jnp.sum(valid), 1.0)
  return ce + bce, {"loss_ce": ce, "loss_mask": bce}


def optax_sigmoid_bce(logits, labels):
  return jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def standin_iterator(cfg, start_step=0, process_index=0, process_count=1):
  local = cfg.batch_size // process_count
  h, w = cfg.data.image_size
  m = cfg.data.max_targets
  step = start_step
  while True:
    images, labels, segs = [], [], []
    for i in range(process_index * local, (process_index + 1) * local):
      rng = np.random.default_rng([cfg.seed, step, i])
      images.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
      lab = np.full((m,), -1, np.int32)
      seg = np.zeros((1, h, w), np.int32)
      for t in range(rng.integers(1, min(m, 4) + 1)):
        lab[t] = rng.integers(0, cfg.model.num_classes)
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        seg[0, y0:y0 + h // 3, x0:x0 + w // 3] = t + 1
      labels.append(lab)
      segs.append(seg)
    yield {"image": np.stack(images), "valid_hw": np.tile(np.int32([h, w]), (local, 1)),
           "labels": np.stack(labels), "segment_ids": np.stack(segs)}
    step += 1
