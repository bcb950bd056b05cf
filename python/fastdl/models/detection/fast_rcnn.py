"""Fast R-CNN (Girshick, 2015): a convolutional backbone, RoI pooling of given proposals, and a
box head that classifies each RoI and refines its box, laid out like torchvision's detectors."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ... import ops
from ...data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ...nn import RoIAlign, RoIPool
from ...ops import BoxCoder
from ..resnet import ResNet, load_checkpoint, resnet18, resnet50
from ._utils import BalancedPositiveNegativeSampler, Matcher
from .roi_heads import FastRCNNPredictor, TwoMLPHead, fastrcnn_loss, postprocess_detections
from .transform import DetectionTransform

__all__ = ["FastRCNN", "ResNetBackbone", "fastrcnn_resnet18", "fastrcnn_resnet50"]


class ResNetBackbone(nn.Sequential):
    """A :class:`~fastdl.models.ResNet` without its pooling and classifier (the course's
    "ResNet without its last two children"), keeping ``conv1, bn1, relu, maxpool, layer1..``
    under their names, so a ResNet state_dict without ``fc.*`` loads into it strictly.

    ``forward(Tensor[B, 3, H, W]) -> Tensor[B, out_channels, ceil(H / stride), ceil(W / stride)]``
    (channels_last, as the ResNet runs). ``num_stages`` keeps ``layer1..layer{num_stages}``:
    4 gives stride 32 (2048 channels for ResNet-50, 512 for ResNet-18), 3 gives stride 16.
    The modules are ``resnet``'s own, not copies.
    """

    def __init__(self, resnet: ResNet, num_stages: int = 4):
        if not isinstance(resnet, ResNet):
            raise TypeError(f"ResNetBackbone expects a fastdl.models.ResNet, got {type(resnet).__name__}")
        if num_stages not in (1, 2, 3, 4):
            raise ValueError(f"ResNetBackbone: num_stages must be 1, 2, 3 or 4, got {num_stages}")
        stages = [f"layer{i}" for i in range(1, num_stages + 1)]
        names = ["conv1", "bn1", "relu", "maxpool", *stages]
        super().__init__(OrderedDict((name, getattr(resnet, name)) for name in names))
        last_block = getattr(resnet, stages[-1])[-1]
        self.out_channels: int = (last_block.conv3 if hasattr(last_block, "conv3") else last_block.conv2).out_channels
        stride = resnet.conv1.stride[0]
        if isinstance(resnet.maxpool, nn.MaxPool2d):
            pool_stride = resnet.maxpool.stride
            stride *= pool_stride if isinstance(pool_stride, int) else pool_stride[0]
        for name in stages:
            stride *= getattr(resnet, name)[0].stride  # 1 where the stage dilates instead
        self.stride: int = stride

    def forward(self, x: Tensor) -> Tensor:
        # fastdl's convolutions read and write channels_last without copies (see ResNet.forward)
        return super().forward(x.contiguous(memory_format=torch.channels_last))


class FastRCNN(nn.Module):
    """Fast R-CNN over proposals given with the images.

    Args:
        backbone: any module mapping ``Tensor[B, 3, H, W]`` to features
            ``Tensor[B, C, H / s, W / s]``, with an ``out_channels`` attribute (``C``) and a
            ``stride`` attribute (``s``), unless ``spatial_scale`` is given. E.g.
            :class:`ResNetBackbone`.
        num_classes: the number of classes including the background, which is class 0 (so a
            data set with 3 object classes labelled 1..3 needs ``num_classes=4``).
        roi_op: ``"align"`` (:class:`fastdl.nn.RoIAlign`, ``aligned=False`` as torchvision) or
            ``"pool"`` (:class:`fastdl.nn.RoIPool`, which ignores ``sampling_ratio``).
        output_size: the RoI feature grid, ``PH = PW = output_size`` (or a pair).
        sampling_ratio: RoIAlign's sample points per bin along each axis.
        spatial_scale: features over image pixels; default ``1 / backbone.stride``.
        representation_size: the width of ``box_head.fc6`` and ``fc7``.
        dropout: dropout after each of ``fc6`` and ``fc7`` while training.
        class_specific_boxes: one set of box deltas per class (``bbox_pred`` has
            ``4 * num_classes`` outputs, as torchvision) or one shared set (4 outputs).
        min_size, max_size, image_mean, image_std, size_divisible: the
            :class:`DetectionTransform` (torchvision's defaults: 800, 1333, ImageNet's).
        box_fg_iou_thresh, box_bg_iou_thresh: RoIs with IoU ``>= fg`` with a ground-truth box
            are positives, ``< bg`` negatives, those in between ignored (:class:`Matcher`).
        box_batch_size_per_image, box_positive_fraction: the RoIs sampled per image for the loss
            (:class:`BalancedPositiveNegativeSampler`).
        bbox_reg_weights: the :class:`fastdl.ops.BoxCoder` weights.
        box_score_thresh, box_nms_thresh, box_detections_per_img: post-processing
            (:func:`postprocess_detections`).

    ``forward(images, proposals, targets=None)``:

    - ``images``: list of ``Tensor[3, H_i, W_i]``, floating point in ``[0, 1]``, any sizes.
    - ``proposals``: list of ``Tensor[L_i, 4]`` xyxy boxes in the pixels of each image
      (e.g. from :class:`SlidingWindowProposals`); ``L_i`` may be 0.
    - ``targets`` (required in training, ignored in eval): list of dicts with
      ``boxes: Tensor[M_i, 4]`` (float, xyxy pixels, positive width and height) and
      ``labels: Tensor[M_i]`` (int64 in ``[1, num_classes)``; ``M_i`` may be 0).

    In training it returns ``{"loss_classifier": Tensor[], "loss_box_reg": Tensor[]}``; the
    ground-truth boxes are added to the proposals, then :attr:`box_batch_size_per_image` RoIs
    are sampled per image (see :func:`fastrcnn_loss`). In eval it returns per image
    ``{"boxes": Tensor[D, 4], "labels": Tensor[D], "scores": Tensor[D]}`` in the original
    image's pixels. The RoIs of the whole batch go through one RoI-pooling call, one pass of
    the head and one NMS call.

    The submodules carry torchvision's names: ``transform``, ``backbone``, ``box_roi_pool``,
    ``box_head.fc6``, ``box_head.fc7``, ``box_predictor.cls_score``, ``box_predictor.bbox_pred``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        roi_op: str = "align",
        output_size: int | tuple[int, int] = 7,
        sampling_ratio: int = 2,
        spatial_scale: float | None = None,
        representation_size: int = 1024,
        dropout: float = 0.0,
        class_specific_boxes: bool = True,
        min_size: int | Sequence[int] = 800,
        max_size: int = 1333,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        size_divisible: int = 32,
        box_fg_iou_thresh: float = 0.5,
        box_bg_iou_thresh: float = 0.5,
        box_batch_size_per_image: int = 512,
        box_positive_fraction: float = 0.25,
        bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
        box_score_thresh: float = 0.05,
        box_nms_thresh: float = 0.5,
        box_detections_per_img: int = 100,
    ):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"FastRCNN: num_classes counts the background and must be >= 2, got {num_classes!r}")
        out_channels = getattr(backbone, "out_channels", None)
        if not isinstance(out_channels, int):
            raise ValueError(f"FastRCNN: the backbone ({type(backbone).__name__}) needs an int attribute out_channels")
        if spatial_scale is None:
            stride = getattr(backbone, "stride", None)
            if isinstance(stride, bool) or not isinstance(stride, (int, float)) or not stride > 0:
                raise ValueError(
                    f"FastRCNN: the backbone ({type(backbone).__name__}) needs a positive number as its stride "
                    f"attribute (got {stride!r}); or pass spatial_scale"
                )
            spatial_scale = 1.0 / stride
        if roi_op == "align":
            box_roi_pool = RoIAlign(output_size, spatial_scale, sampling_ratio)
        elif roi_op == "pool":
            box_roi_pool = RoIPool(output_size, spatial_scale)
        else:
            raise ValueError(f"FastRCNN: roi_op must be 'align' or 'pool', got {roi_op!r}")
        if box_detections_per_img < 0:
            raise ValueError(f"FastRCNN: box_detections_per_img must be >= 0, got {box_detections_per_img}")

        self.num_classes = num_classes
        self.transform = DetectionTransform(min_size, max_size, image_mean, image_std, size_divisible)
        self.backbone = backbone
        self.box_roi_pool = box_roi_pool
        pooled_height, pooled_width = box_roi_pool.output_size
        self.box_head = TwoMLPHead(out_channels * pooled_height * pooled_width, representation_size, dropout)
        self.box_predictor = FastRCNNPredictor(representation_size, num_classes, class_specific_boxes)
        self.box_coder = BoxCoder(bbox_reg_weights)
        self.proposal_matcher = Matcher(box_fg_iou_thresh, box_bg_iou_thresh, allow_low_quality_matches=False)
        self.fg_bg_sampler = BalancedPositiveNegativeSampler(box_batch_size_per_image, box_positive_fraction)
        self.score_thresh = box_score_thresh
        self.nms_thresh = box_nms_thresh
        self.detections_per_img = box_detections_per_img

    def forward(
        self,
        images: Sequence[Tensor],
        proposals: Sequence[Tensor],
        targets: Sequence[dict[str, Tensor]] | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training and targets is None:
            raise ValueError("FastRCNN: targets are required in training mode (call model.eval() to detect)")
        self.transform.check_images(images)
        _check_proposals(proposals, len(images))
        if self.training:
            _check_targets(targets, len(images), self.num_classes)
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        image_list, proposals, targets = self.transform(images, proposals, targets if self.training else None)
        features = self.backbone(image_list.tensors)

        if self.training:
            proposals, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals))
        class_logits, box_regression = self.box_predictor(box_features)

        if self.training:
            loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
            return {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        detections = postprocess_detections(
            class_logits,
            box_regression,
            proposals,
            image_list.image_sizes,
            self.box_coder,
            self.score_thresh,
            self.nms_thresh,
            self.detections_per_img,
        )
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)

    def select_training_samples(
        self, proposals: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per image: append the ground-truth boxes to the proposals, label each by its match
        (:attr:`proposal_matcher`; 0 background, -1 ignored), sample RoIs
        (:attr:`fg_bg_sampler`) and encode their matched boxes.

        Returns ``(rois, labels, regression_targets)``: per image ``Tensor[K_i, 4]``,
        ``Tensor[K_i]`` (int64) and ``Tensor[K_i, 4]``, the RoIs in proposal order.
        """
        all_rois, all_labels, all_matched = [], [], []
        for image_proposals, target in zip(proposals, targets):
            gt_boxes = target["boxes"].to(image_proposals.dtype)
            rois = torch.cat([image_proposals, gt_boxes])
            if gt_boxes.size(0) == 0:
                labels = torch.zeros(rois.size(0), dtype=torch.int64, device=rois.device)
                matched = rois  # every RoI is background: its regression target is never read
            else:
                matches = self.proposal_matcher(ops.box_iou(gt_boxes, rois))
                matched_gt = matches.clamp(min=0)
                labels = target["labels"].to(torch.int64)[matched_gt]
                labels[matches == Matcher.BELOW_LOW_THRESHOLD] = 0
                labels[matches == Matcher.BETWEEN_THRESHOLDS] = -1
                matched = gt_boxes[matched_gt]
            all_rois.append(rois)
            all_labels.append(labels)
            all_matched.append(matched)
        positive_masks, negative_masks = self.fg_bg_sampler(all_labels)
        sampled = [torch.nonzero(pos | neg).flatten() for pos, neg in zip(positive_masks, negative_masks)]
        all_rois = [rois[s] for rois, s in zip(all_rois, sampled)]
        all_labels = [labels[s] for labels, s in zip(all_labels, sampled)]
        regression_targets = self.box_coder.encode([m[s] for m, s in zip(all_matched, sampled)], all_rois)
        return all_rois, all_labels, list(regression_targets)


def _check_proposals(proposals, num_images: int) -> None:
    if not isinstance(proposals, (list, tuple)):
        raise TypeError(f"proposals must be a list of Tensor[L, 4], one per image, got {type(proposals).__name__}")
    if len(proposals) != num_images:
        raise ValueError(f"FastRCNN: {num_images} images but {len(proposals)} proposal tensors")
    for i, boxes in enumerate(proposals):
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.size(1) != 4:
            shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
            raise ValueError(f"proposals[{i}] must be a Tensor[L, 4] (x1, y1, x2, y2), got {shape}")


def _check_targets(targets, num_images: int, num_classes: int) -> None:
    if not isinstance(targets, (list, tuple)) or len(targets) != num_images:
        count = len(targets) if isinstance(targets, (list, tuple)) else type(targets).__name__
        raise ValueError(f"FastRCNN: targets must be a list of {num_images} dicts (one per image), got {count}")
    for i, target in enumerate(targets):
        if not isinstance(target, dict) or "boxes" not in target or "labels" not in target:
            raise ValueError(f"targets[{i}] must be a dict with 'boxes' and 'labels', got {target!r:.100}")
        boxes, labels = target["boxes"], target["labels"]
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.size(1) != 4 or not boxes.is_floating_point():
            shape = f"{boxes.dtype} {tuple(boxes.shape)}" if isinstance(boxes, Tensor) else type(boxes).__name__
            raise ValueError(
                f"targets[{i}]['boxes'] must be a floating-point Tensor[M, 4] (x1, y1, x2, y2), got {shape}"
            )
        if (
            not isinstance(labels, Tensor)
            or labels.dim() != 1
            or labels.size(0) != boxes.size(0)
            or labels.is_floating_point()
            or labels.dtype == torch.bool
        ):
            shape = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(
                f"targets[{i}]['labels'] must be an integer Tensor[{boxes.size(0)}] (one per box), got {shape}"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"targets[{i}]['labels'] must lie in [0, {num_classes}) (num_classes={num_classes} counts the "
                f"background, 0), got values in [{int(labels.min())}, {int(labels.max())}]"
            )
        degenerate = torch.nonzero((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).flatten()
        if degenerate.numel():
            j = int(degenerate[0])
            raise ValueError(
                f"targets[{i}]['boxes'][{j}] = {boxes[j].tolist()} has no positive width and height "
                f"(boxes are x1, y1, x2, y2 with x2 > x1 and y2 > y1)"
            )


def _fast_rcnn(resnet: ResNet, num_classes: int, weights, kwargs) -> FastRCNN:
    model = FastRCNN(ResNetBackbone(resnet), num_classes, **kwargs)
    if weights is not None:
        load_checkpoint(model, weights)
    return model


def fastrcnn_resnet50(
    num_classes: int,
    *,
    weights: str | os.PathLike | None = None,
    weights_backbone: str | os.PathLike | None = None,
    **kwargs,
) -> FastRCNN:
    """Fast R-CNN on ResNet-50 as the course builds it: the ResNet without its pooling and
    classifier (stride 32, 2048 channels), RoIAlign 7x7 at ``spatial_scale = 1/32`` with
    ``sampling_ratio=2``, ``fc6``/``fc7`` of 1024.

    ``weights_backbone``: the path of a ResNet-50 checkpoint (e.g. torchvision's ImageNet
    weights saved with ``torch.save(state_dict)``), loaded strictly into the ResNet before its
    ``fc`` is dropped. ``weights``: the path of a whole-model checkpoint of this architecture
    (:func:`fastdl.models.load_checkpoint`). ``kwargs`` go to :class:`FastRCNN`.
    """
    return _fast_rcnn(resnet50(weights=weights_backbone), num_classes, weights, kwargs)


def fastrcnn_resnet18(
    num_classes: int,
    *,
    weights: str | os.PathLike | None = None,
    weights_backbone: str | os.PathLike | None = None,
    **kwargs,
) -> FastRCNN:
    """Fast R-CNN on ResNet-18 (stride 32, 512 channels), small enough to train on a CPU; the
    arguments are those of :func:`fastrcnn_resnet50`."""
    return _fast_rcnn(resnet18(weights=weights_backbone), num_classes, weights, kwargs)
