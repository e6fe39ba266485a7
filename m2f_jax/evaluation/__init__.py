"""Metrics: panoptic quality (COCO panoptic API rules), mask AP (pycocotools), mIoU; an evaluator."""
from m2f_jax.evaluation.evaluator import Evaluator, headline, supported_tasks
from m2f_jax.evaluation.instance_ap import InstanceAP, encode_masks
from m2f_jax.evaluation.miou import ConfusionMatrix
from m2f_jax.evaluation.panoptic_quality import PQStat

__all__ = ["ConfusionMatrix", "Evaluator", "InstanceAP", "PQStat", "encode_masks", "headline",
           "supported_tasks"]
