"""Keras 3 (torch backend) training throughput on the same networks; run by bench_train.py
in a bench-only environment: KERAS_BACKEND=torch python keras_train.py MODEL N BATCH."""
import json
import sys
import time

import numpy as np
import keras
from keras import layers

name, n, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if name == "cifar-basic":
    net = keras.Sequential([keras.Input((32, 32, 3)),
        layers.Conv2D(32, 3, activation="relu"), layers.Conv2D(32, 3, activation="relu"),
        layers.MaxPooling2D(), layers.Dropout(0.25),
        layers.Conv2D(64, 3, activation="relu"), layers.Conv2D(64, 3, activation="relu"),
        layers.MaxPooling2D(), layers.Dropout(0.25), layers.Flatten(),
        layers.Dense(256, activation="relu"), layers.Dropout(0.5), layers.Dense(10, activation="softmax")])
else:
    seq = [keras.Input((32, 32, 3))]
    for f in (32, 64, 128):
        seq += [layers.Conv2D(f, 3, padding="same", activation="relu"), layers.BatchNormalization(),
                layers.Conv2D(f, 3, padding="same", activation="relu"), layers.BatchNormalization(),
                layers.MaxPooling2D()]
    net = keras.Sequential(seq + [layers.Flatten(), layers.Dropout(0.2), layers.Dense(1024, activation="relu"),
                                  layers.Dropout(0.2), layers.Dense(10, activation="softmax")])
net.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
            metrics=["accuracy"])
rng = np.random.default_rng(0)
x = rng.integers(0, 256, size=(n, 32, 32, 3)).astype("float32") / 255
y = rng.integers(0, 10, size=n)


class Timer(keras.callbacks.Callback):
    def on_train_batch_end(self, batch_i, logs=None):
        if batch_i == 4:
            self.t0 = time.perf_counter()
        self.last = batch_i


t = Timer()
net.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=[t], shuffle=True)
secs = time.perf_counter() - t.t0
print(json.dumps({"images_per_s": (t.last - 4) * batch / secs}))
