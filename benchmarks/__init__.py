"""Benchmark and demo recipes: the small real datasets (`benchmarks.data`) and the launcher of training runs
(`benchmarks.launch`). They live beside the library, not in it: the wheel holds only ``timm_sadistill``, and their
extras (scikit-learn, scikit-image) are the demo's and the benchmarks' concern. Import them with the repository
root on ``sys.path`` (the scripts insert it; pytest's ``pythonpath`` does it for the tests).
"""
