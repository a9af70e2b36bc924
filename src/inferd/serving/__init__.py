"""The data plane: one prediction procedure for every route and protocol (:mod:`.plane`), and
the context a call carries through it (:mod:`.context`)."""

from inferd.serving.context import ClientGone, RequestContext
from inferd.serving.plane import DataPlane, Decoded, Inbound

__all__ = ["ClientGone", "DataPlane", "Decoded", "Inbound", "RequestContext"]
