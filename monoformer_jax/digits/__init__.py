"""The embedded default: a tiny MonoFormer on scikit-learn's 8x8 digits (configs/digits.py).

    source.py      the `digits` dataset: the images, the sentences about numbers,
                   the reading, interleaved and edit examples (data/datasets.py
                   registers it)
    evaluators.py  its metrics: the classifier's accuracy and Fréchet distance of
                   samples, reading, interleaved and editing (eval/registry.py
                   registers them), and the pictures they leave at the end of a run

Generic code never names the demo: it asks the two registries.
"""
