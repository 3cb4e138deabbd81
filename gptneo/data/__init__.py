"""Corpus preparation (text -> BPE tokens -> TFRecord windows) and tf.data input pipelines."""
