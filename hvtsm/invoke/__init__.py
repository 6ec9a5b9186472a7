"""`hvtsm invoke`: run program code on request in a zone, warm from the pool when it can."""

from hvtsm.invoke.invoker import Invoker, InvokeRequest, InvokeResult

__all__ = ["InvokeRequest", "InvokeResult", "Invoker"]
