"""smtpdcheck: is a more-preferred mail server up?

The core shared by the ``smtpdcheck`` command and ``smtpdcheck-policyd``:
server lists, the stop rule, DNS, greeting probes, caches.
"""

from .check import Checker as Checker, CheckResult as CheckResult, ServerReport as ServerReport
from .probe import Outcome as Outcome, Prober as Prober, ProbeResult as ProbeResult
from .resolver import MXKind as MXKind, MXLookup as MXLookup, Resolver as Resolver
from .servers import Server as Server, ServerSyntaxError as ServerSyntaxError, parse_server as parse_server
from .stoprule import StopSet as StopSet, eligibility as eligibility, eligible as eligible

__version__ = "0.1.0"

__all__ = [
    "CheckResult", "Checker", "MXKind", "MXLookup", "Outcome", "Prober", "ProbeResult",
    "Resolver", "Server", "ServerReport", "ServerSyntaxError", "StopSet", "eligibility",
    "eligible", "parse_server",
]
