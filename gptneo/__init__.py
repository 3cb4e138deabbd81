"""gptneo: GPT-2/GPT-3-style language models on Mesh-TensorFlow, configured with gin."""
import os

# TF's C++ start-up chatter (oneDNN, CUDA probes) would bury our logs; TF_CPP_MIN_LOG_LEVEL=0
# brings it back.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
