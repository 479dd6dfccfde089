"""Neural style transfer (Gatys, Ecker and Bethge 2015, "A Neural Algorithm of Artistic Style").

A pretrained backbone's activations describe an image: those of a deep layer its content, the Gram matrices
(channel correlations) of several layers its style. The result is an image optimised so that its content
matches one picture and its style another, with a total-variation term for smoothness. The layers come from
the backbone registry (`BackboneSpec.content_layers` / `style_layers`); the loss follows TensorFlow's style
transfer tutorial (means over positions, images in [0, 1]), whose default weights suit VGG19 with ImageNet
weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tltool.errors import BackboneError
from tltool.models.backbones import BackboneSpec, ResolvedWeights, preprocessing_layer


@dataclass(frozen=True)
class LossWeights:
    content: float
    style: float
    tv: float

    @classmethod
    def of(cls, spec: BackboneSpec, content=None, style=None, tv=None) -> "LossWeights":
        """The given weights, the backbone's registry defaults for those not given."""
        default = cls(*spec.style_loss_weights)
        return cls(default.content if content is None else content, default.style if style is None else style,
                   default.tv if tv is None else tv)


def declared_layers(spec: BackboneSpec) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The backbone's content and style layers; a one-line error for a backbone that declares none."""
    if not spec.content_layers or not spec.style_layers:
        from tltool.models.backbones import get_backbone_spec, list_backbones

        usable = ", ".join(name for name in list_backbones()
                           if get_backbone_spec(name).content_layers and get_backbone_spec(name).style_layers)
        raise BackboneError(f"{spec.name} declares no content and style layers for stylize. Use one that "
                            f"does: {usable}.")
    return spec.content_layers, spec.style_layers


def feature_model(spec: BackboneSpec, weights: ResolvedWeights, height: int, width: int):
    """pixels in [0, 1], (1, H, W, 3) -> [content activations..., style activations...]."""
    import keras

    from tltool.models.transfer import load_backbone_weights

    content, style = declared_layers(spec)
    net = spec.constructor_fn()(include_top=False, weights=weights.keras_arg, input_shape=(height, width, 3),
                                **dict(spec.extra_kwargs))
    if weights.kind == "file":
        load_backbone_weights(net, weights.path, spec)
    net.trainable = False
    taps = keras.Model(net.input, [net.get_layer(name).output for name in (*content, *style)])
    pixels = keras.Input((height, width, 3))
    scaled = keras.layers.Rescaling(255.0)(pixels)  # the backbone's preprocessing expects 0-255 pixels
    prep = preprocessing_layer(spec)
    return keras.Model(pixels, taps(prep(scaled) if prep is not None else scaled))


def gram_matrix(activations):
    """Channel correlations of (1, H, W, C) activations, averaged over positions: (C, C)."""
    import tensorflow as tf

    channels = tf.shape(activations)[-1]
    flat = tf.reshape(activations, (-1, channels))
    return tf.matmul(flat, flat, transpose_a=True) / tf.cast(tf.shape(flat)[0], tf.float32)


class StyleLoss:
    """The total loss of an image and its three parts, against fixed content and style targets."""

    def __init__(self, model, content_image: np.ndarray, style_image: np.ndarray, n_content: int,
                 weights: LossWeights):
        import tensorflow as tf

        self.model, self.n_content, self.weights = model, n_content, weights
        self.content_targets = [tf.constant(a) for a in model(content_image[None])[:n_content]]
        self.style_targets = [gram_matrix(a) for a in model(style_image[None])[n_content:]]
        self._step = tf.function(self._value_and_gradient, reduce_retracing=True)  # traced once per image shape

    def parts(self, image):
        """(total, content, style, tv) for an image tensor (1, H, W, 3) in [0, 1]."""
        import tensorflow as tf

        outputs = self.model(image)
        content = tf.add_n([tf.reduce_mean(tf.square(a - t))
                            for a, t in zip(outputs[:self.n_content], self.content_targets)]) / self.n_content
        style = tf.add_n([tf.reduce_mean(tf.square(gram_matrix(a) - t))
                          for a, t in zip(outputs[self.n_content:], self.style_targets)]) / len(self.style_targets)
        tv = tf.reduce_sum(tf.image.total_variation(image))
        w = self.weights
        return w.content * content + w.style * style + w.tv * tv, content, style, tv

    def value_and_gradient(self, image):
        """(total, content, style, tv, d total / d image), compiled."""
        return self._step(image)

    def _value_and_gradient(self, image):
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(image)
            total, content, style, tv = self.parts(image)
        return total, content, style, tv, tape.gradient(total, image)
