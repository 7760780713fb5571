"""lacy-fast: pretraining small language models that learn when to <CALL> a bigger one."""

__version__ = "0.1.0"
