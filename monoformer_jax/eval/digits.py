"""Are generated digits recognisable? A classifier fitted on the real ones says.

The classifier (logistic regression on scikit-learn's 8x8 digits, pixels in
[0, 1]) labels held-out real digits right ~93% of the time (5-fold); `prompted_accuracy` is the share
of generated images it labels with the digit they were prompted with.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=1)
def digit_classifier():
  from sklearn.datasets import load_digits
  from sklearn.linear_model import LogisticRegression
  digits = load_digits()
  clf = LogisticRegression(max_iter=2000, C=0.5)
  clf.fit(digits.images.reshape(len(digits.images), -1) / 16.0, digits.target)
  return clf


def prompted_accuracy(images_Bx8x8, labels_B) -> tuple[float, np.ndarray]:
  """(accuracy, per-digit accuracy [10]) of images in [0, 1] against prompts."""
  pred = digit_classifier().predict(np.asarray(images_Bx8x8).reshape(len(labels_B), -1))
  labels_B = np.asarray(labels_B)
  per_digit = np.array([(pred[labels_B == d] == d).mean() if (labels_B == d).any()
                        else np.nan for d in range(10)])
  return float((pred == labels_B).mean()), per_digit


def sample_metrics(images_BxhxwxC, labels_B) -> dict:
  """The `digits_classifier` sample metric: the share of samples recognised as
  their prompted digit, overall and per digit."""
  accuracy, per_digit = prompted_accuracy(images_BxhxwxC, labels_B)
  return dict(classifier_accuracy=accuracy, per_digit=per_digit.tolist())
