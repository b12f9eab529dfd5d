"""Preloaded into the forkserver: makes its children find the accelerator lost to the fork, as a library that
initializes CUDA at import (torchao) does on a GPU host, which this CPU machine cannot reproduce for real."""

from services.common import platform

platform.accelerator_lost_to_fork = lambda: True
