"""`model.fit` for a multi-worker run: Keras's epoch loop, on MultiWorkerMirroredStrategy's all-reduce.

Keras 3's `model.fit` does not run under MultiWorkerMirroredStrategy (keras-team/keras#20585: its first
step fails to reduce per-replica values), so multi-worker stages train with this loop instead: the same
callbacks and logs (loss, accuracy, val_loss, val_accuracy) as `fit`, the compiled optimizer, the loss
(with its label smoothing) and the class weights, the gradients summed over every replica.

The workers must run the same number of steps, or the all-reduce waits for ever: every epoch has the largest
shard's number of batches, the smaller shards padded with empty batches (weight 0). Losses and accuracies
are sums over every worker's examples, so the logs are the same on every worker; the decision to stop is the
chief's all the same (its early stopping may carry a resumed patience count the others do not have).
"""

from __future__ import annotations

import math

import numpy as np


def cluster_fit(cluster, model, train_ds, val_ds, epochs: int, callbacks: list, batches: tuple[int, int],
                class_weight: dict | None = None, label_smoothing: float = 0.0, verbose: int = 1):
    """Train `model` (compiled, built in `cluster.strategy`'s scope) for `epochs`; returns a Keras History.

    Args:
        train_ds, val_ds: this worker's batched (inputs, one-hot labels) datasets: its shard.
        batches: how many batches this worker's shard of each holds at most (files that fail to decode
            only shorten a stream; the padding makes up for them).
    """
    import keras

    per_worker = max(1, cluster.replicas // cluster.num_workers)
    train_steps = math.ceil(max(cluster.counts(batches[0])) / per_worker)
    val_steps = math.ceil(max(cluster.counts(batches[1])) / per_worker)
    steps = _Steps(cluster, model, class_weight, label_smoothing)
    train = _distributed(cluster, train_ds, train_steps * per_worker, model)
    val = _distributed(cluster, val_ds, val_steps * per_worker, model)
    history = keras.callbacks.History()
    listeners = keras.callbacks.CallbackList(list(callbacks) + [history], add_progbar=verbose != 0, model=model,
                                             verbose=verbose, epochs=epochs, steps=train_steps)
    model.stop_training = False
    listeners.on_train_begin()
    # The chief may have resumed mid-stage (EpochCheckpoint loaded its epoch's weights and optimizer state).
    first_epoch = int(cluster.broadcast_number(getattr(model, "_initial_epoch", None) or 0))
    steps.sync(include_optimizer=True)
    logs = {}
    for epoch in range(first_epoch, epochs):
        listeners.on_epoch_begin(epoch)
        logs = _run_epoch(steps.train, train, train_steps, listeners.on_train_batch_end)
        val_logs = _run_epoch(steps.evaluate, val, val_steps, listeners.on_test_batch_end)
        logs.update({f"val_{k}": v for k, v in val_logs.items()})
        listeners.on_epoch_end(epoch, logs)
        model.stop_training = bool(cluster.broadcast_number(float(bool(model.stop_training))))
        if model.stop_training:
            break
    listeners.on_train_end(logs)
    steps.sync(include_optimizer=False)  # early stopping restored the best epoch's weights on the chief
    return history


def _run_epoch(step_fn, dataset, steps: int, on_batch_end) -> dict:
    """One pass of `step_fn` over `steps` global batches; the loss and accuracy over every worker's examples."""
    totals = np.zeros(3)  # sum of weighted losses, correct answers, examples
    iterator = iter(dataset)
    for step in range(steps):
        totals += np.asarray([float(v) for v in step_fn(iterator)])
        count = max(totals[2], 1.0)
        on_batch_end(step, {"loss": totals[0] / count, "accuracy": totals[1] / count})
    count = max(totals[2], 1.0)
    return {"loss": float(totals[0] / count), "accuracy": float(totals[1] / count)}


def _distributed(cluster, dataset, batches: int, model):
    """`dataset` as exactly `batches` batches of (inputs, labels, weight): the real ones weighted 1, then
    empty ones weighted 0, handed to this worker's replicas."""
    import tensorflow as tf

    shape = tuple(model.input_shape[1:])
    classes = int(model.output_shape[-1])
    real = dataset.map(lambda x, y: (tf.cast(x, tf.float32), tf.cast(y, tf.float32), tf.ones(tf.shape(y)[:1])))
    blank = tf.data.Dataset.from_tensors((tf.zeros((1, *shape)), tf.zeros((1, classes)), tf.zeros((1,)))).repeat()
    padded = real.concatenate(blank).take(batches).prefetch(tf.data.AUTOTUNE)
    return cluster.strategy.distribute_datasets_from_function(lambda _context: padded)


class _Steps:
    """The compiled training and evaluation steps of one fit, and the weight synchronisation around it."""

    def __init__(self, cluster, model, class_weight: dict | None, label_smoothing: float):
        import keras
        import tensorflow as tf

        self.cluster, self.model, self.optimizer = cluster, model, model.optimizer
        num_classes = int(model.output_shape[-1])
        weights = np.ones(num_classes, np.float32)
        for label, weight in (class_weight or {}).items():
            weights[int(label)] = weight
        self.class_weights = tf.constant(weights)
        self.loss = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing, reduction=None)
        with cluster.strategy.scope():
            if not self.optimizer.built:
                self.optimizer.build(model.trainable_variables)
        self.train = tf.function(self._train)
        self.evaluate = tf.function(self._evaluate)

    def sync(self, include_optimizer: bool) -> None:
        """Every worker to the chief's weights (and optimizer state): after a resume, after a fit."""
        variables = list(self.model.variables) + (list(self.optimizer.variables) if include_optimizer else [])
        self.cluster.sync_variables(variables)

    def _sums(self, per_example, probs, y, valid):
        import tensorflow as tf

        right = tf.cast(tf.equal(tf.argmax(probs, -1), tf.argmax(y, -1)), tf.float32)
        return tf.reduce_sum(per_example), tf.reduce_sum(right * valid), tf.reduce_sum(valid)

    def _train(self, iterator):
        import tensorflow as tf

        model, optimizer, replicas = self.model, self.optimizer, self.cluster.replicas

        def step(x, y, valid):
            examples = tf.distribute.get_replica_context().all_reduce("SUM", tf.reduce_sum(valid))
            with tf.GradientTape() as tape:
                probs = model(x, training=True)
                per_example = self.loss(y, probs) * valid * tf.gather(self.class_weights, tf.argmax(y, -1))
                # As fit's mean over the global batch; gradients are summed over the replicas.
                loss = tf.reduce_sum(per_example) / tf.maximum(examples, 1.0)
                if model.losses:
                    loss += tf.add_n(model.losses) / replicas
                scaled = optimizer.scale_loss(loss) if hasattr(optimizer, "scale_loss") else loss
            grads = tape.gradient(scaled, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return self._sums(per_example, probs, y, valid)

        return self._reduced(step, iterator)

    def _evaluate(self, iterator):
        def step(x, y, valid):
            probs = self.model(x, training=False)
            return self._sums(self.loss(y, probs) * valid, probs, y, valid)

        return self._reduced(step, iterator)

    def _reduced(self, step, iterator):
        import tensorflow as tf

        strategy = self.cluster.strategy
        results = strategy.run(step, args=next(iterator))
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, r, axis=None) for r in results]
