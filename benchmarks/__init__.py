"""fastdl's benchmarks: one pytest-benchmark module per op (``bench_<op>.py``).

Run them with ``fastdl bench`` (which prints the comparison table) or directly with pytest.
"""
