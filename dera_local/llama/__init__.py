"""The llama.cpp layer: loaded models and contexts (`backend`), ggml's devices
(`devices`), its log (`log`), and GGUF headers read without llama.cpp (`gguf_inspect`).
"""
