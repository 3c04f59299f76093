"""Keras backbones with ImageNet weights, and the classifier built on top of them.

A classifier is: uint8 RGB input -> in-graph scaling to [-1, 1] -> trunk (frozen) -> top block
(fine-tunable) -> global average pooling -> dense logits. Splitting trunk and top lets training
cache the trunk's output once and fine-tune only the top block on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from model_export.sources import Artifact


def _mobilenet_blocks(first: int, last: int = 13) -> tuple[str, ...]:
    """Keras MobileNet's layer names for depthwise-separable blocks first..last, in order."""
    names: list[str] = []
    for i in range(first, last + 1):
        if i in (2, 4, 6, 12) and i != first:  # stride-2 blocks start with an explicit padding
            names.append(f"conv_pad_{i}")
        names += [
            f"conv_dw_{i}",
            f"conv_dw_{i}_bn",
            f"conv_dw_{i}_relu",
            f"conv_pw_{i}",
            f"conv_pw_{i}_bn",
            f"conv_pw_{i}_relu",
        ]
    return tuple(names)


# The layers stage 2 fine-tunes (both plain chains; the trunk below them is frozen and cached).
# MobileNet fine-tunes its last three blocks (11-13): its trunk is cheap, and on 2 cores the top
# three cost about a quarter of Xception's top block per view. Xception fine-tunes block14 only:
# block13 would multiply the cache (19x19x728 per view) and the training time several times over.
TOP_BLOCK_LAYERS: dict[str, tuple[str, ...]] = {
    "xception": (
        "block14_sepconv1",
        "block14_sepconv1_bn",
        "block14_sepconv1_act",
        "block14_sepconv2",
        "block14_sepconv2_bn",
        "block14_sepconv2_act",
    ),
    "mobilenet_v1": _mobilenet_blocks(11),
}
IN_GRAPH_NORMALISATION = "x / 127.5 - 1 (float32), from uint8 RGB 0..255"


@dataclass
class Backbone:
    family: str
    input_size: int
    trunk: keras.Model  # image in [-1, 1] -> activations before the top block
    top_layers: list[keras.layers.Layer]

    @property
    def cut_layer(self) -> str:
        """The first fine-tuned layer: the trunk ends at its input."""
        return self.top_layers[0].name

    @property
    def cut_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.trunk.output.shape[1:])


def _xception_from_keras_model(path: Path, size: int) -> keras.Model:
    wrapper = keras.saving.load_model(path, compile=False)
    pretrained = next(layer for layer in wrapper.layers if layer.name == "xception")
    model = keras.applications.Xception(weights=None, include_top=False, input_shape=(size, size, 3))
    model.set_weights(pretrained.get_weights())
    return model


def _mobilenet_from_slim_graph(path: Path, size: int) -> keras.Model:
    import tensorflow as tf  # build-only dependency: reads the frozen GraphDef's constants

    graph = tf.compat.v1.GraphDef()
    graph.ParseFromString(path.read_bytes())
    consts = {n.name: tf.make_ndarray(n.attr["value"].tensor) for n in graph.node if n.op == "Const"}
    model = keras.applications.MobileNet(
        weights=None, include_top=False, alpha=1.0, input_shape=(size, size, 3)
    )

    def bn(slim: str) -> list[np.ndarray]:
        stem = f"MobilenetV1/{slim}/BatchNorm/"
        return [consts[stem + k] for k in ("gamma", "beta", "moving_mean", "moving_variance")]

    model.get_layer("conv1").set_weights([consts["MobilenetV1/Conv2d_0/weights"]])
    model.get_layer("conv1_bn").set_weights(bn("Conv2d_0"))
    for i in range(1, 14):
        dw, pw = f"Conv2d_{i}_depthwise", f"Conv2d_{i}_pointwise"
        model.get_layer(f"conv_dw_{i}").set_weights([consts[f"MobilenetV1/{dw}/depthwise_weights"]])
        model.get_layer(f"conv_dw_{i}_bn").set_weights(bn(dw))
        model.get_layer(f"conv_pw_{i}").set_weights([consts[f"MobilenetV1/{pw}/weights"]])
        model.get_layer(f"conv_pw_{i}_bn").set_weights(bn(pw))
    return model


def _from_h5(family: str, path: Path, size: int) -> keras.Model:
    shape = (size, size, 3)
    if family == "xception":
        return keras.applications.Xception(weights=str(path), include_top=False, input_shape=shape)
    return keras.applications.MobileNet(weights=str(path), include_top=False, input_shape=shape)


def pretrained_base(artifact: Artifact, weights: Path, size: int) -> keras.Model:
    """The ImageNet base network (no classifier), float input already scaled to [-1, 1]."""
    if artifact.loader == "keras-model-first-layer":
        return _xception_from_keras_model(weights, size)
    if artifact.loader == "tf-graphdef-slim-mobilenet-v1":
        return _mobilenet_from_slim_graph(weights, size)
    return _from_h5(artifact.backbone, weights, size)


def split_backbone(family: str, base: keras.Model, size: int) -> Backbone:
    names = TOP_BLOCK_LAYERS[family]
    trunk = keras.Model(base.input, base.get_layer(names[0]).input, name=f"{family}_trunk")
    trunk.trainable = False
    return Backbone(family, size, trunk, [base.get_layer(n) for n in names])


def top_model(backbone: Backbone, n_labels: int, dropout: float = 0.0) -> keras.Model:
    """Cached trunk activations -> logits: what both training stages fit."""
    inputs = keras.Input(backbone.cut_shape, name="trunk_activations")
    x = inputs
    for layer in backbone.top_layers:
        x = layer(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    logits = keras.layers.Dense(n_labels, name="logits")(x)
    return keras.Model(inputs, logits, name=f"{backbone.family}_top")


def pooled_features_model(backbone: Backbone) -> keras.Model:
    """Cached trunk activations -> pooled features of the (frozen) top block, for stage 1."""
    inputs = keras.Input(backbone.cut_shape)
    x = inputs
    for layer in backbone.top_layers:
        x = layer(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))


def classifier(backbone: Backbone, head: keras.Model, name: str) -> keras.Model:
    """The exported graph: uint8 image -> logits, with the scaling to [-1, 1] inside."""
    size = backbone.input_size
    image = keras.Input((size, size, 3), dtype="uint8", name="image")
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale")(image)
    x = backbone.trunk(x)
    logits = head(x)
    return keras.Model(image, logits, name=name.replace("-", "_"))


def top_weights(head: keras.Model, include_top_block: bool) -> dict[str, np.ndarray]:
    """The weights that differ from the pretrained backbone: the head, plus the top block if tuned."""
    return {
        w.path: keras.ops.convert_to_numpy(w)
        for w in head.weights
        if include_top_block or w.path.startswith("logits/")
    }


def apply_weights(head: keras.Model, saved: dict[str, np.ndarray]) -> None:
    by_path = {w.path: w for w in head.weights}
    unknown = sorted(set(saved) - set(by_path))
    if unknown:
        raise ValueError(f"saved weights name variables the model lacks: {unknown[:3]}")
    for path, value in saved.items():
        by_path[path].assign(value.astype(by_path[path].dtype))
