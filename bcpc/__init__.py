"""bcpc: compile PyTorch models into provably robust (certified) ones with Box Constraint Propagation.

Architecture (details in docs/architecture.md):

* ``bcpc/`` – the API (:func:`compile`), the pipeline, the bound domain (:mod:`bcpc.domain`), the
  rule registry, the Lipschitz bounds, the last-layer solver and the certified module;
* ``passes/`` (installed as ``bcpc.passes``) – trace, canonicalize, shapes, analysis, lower; one
  pass per module, run in the order bcpc/pipeline.py gives;
* ``rules/`` (installed as ``bcpc.rules``) – one module per op family, each op registered once
  with a ball and a box function.
"""
from bcpc import errors, nn
from bcpc.api import compile, parse_norm
from bcpc.certified import CertifiedModule, CertifiedOutput
from bcpc.domain import Bound
from bcpc.inspect import inspect

__all__ = ["compile", "parse_norm", "CertifiedModule", "CertifiedOutput", "Bound", "errors", "inspect", "nn"]
__version__ = "0.1.0"
