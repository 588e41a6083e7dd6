"""Scripts that llavaq runs with ANOTHER interpreter (a serving engine's own venv), as files, never imported.

``vllm_runner.py``: run by the ``.venv-vllm`` python (``make vllm-env``); it imports vLLM, llavaq does not.
"""
