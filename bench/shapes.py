"""Model shapes the benchmarks build with random weights (no download), shared by the scripts
in this folder (each run as ``python bench/NAME.py``, so this file is importable as ``shapes``)."""

# SmolLM2-135M, the embedded model's shape: 30 layers, hidden 576, 9/3 heads, vocab 49152.
SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
)

# The 1.2B Llama shape of the fast-training and serving issues: hidden 2048, 16 layers, 32/8 heads.
LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    tie_word_embeddings=True,
)
