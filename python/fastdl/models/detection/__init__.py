"""Object detection laid out like ``torchvision.models.detection``: Fast R-CNN over given
proposals, and the pieces it is made of, each usable on its own."""

from ...ops import BoxCoder
from ._utils import BalancedPositiveNegativeSampler, Matcher
from .fast_rcnn import FastRCNN, ResNetBackbone, fastrcnn_resnet18, fastrcnn_resnet50
from .proposals import SlidingWindowProposals, top_by_ground_truth_iou
from .roi_heads import FastRCNNPredictor, TwoMLPHead, fastrcnn_loss, postprocess_detections
from .transform import DetectionTransform, ImageList, resize_boxes

__all__ = [
    "BalancedPositiveNegativeSampler",
    "BoxCoder",
    "DetectionTransform",
    "FastRCNN",
    "FastRCNNPredictor",
    "ImageList",
    "Matcher",
    "ResNetBackbone",
    "SlidingWindowProposals",
    "TwoMLPHead",
    "fastrcnn_loss",
    "fastrcnn_resnet18",
    "fastrcnn_resnet50",
    "postprocess_detections",
    "resize_boxes",
    "top_by_ground_truth_iou",
]
