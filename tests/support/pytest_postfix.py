"""pytest glue for the throwaway-Postfix harness in ``tests.support.postfix``.

Kept separate from the harness so the harness stays importable by scripts without pytest
conventions, and so conftest can decide how to register the fixture.
"""

from __future__ import annotations

import os
import pathlib
import shutil
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import trio

from tests.support.postfix import (
    PostfixInstance,
    make_postfix,
    make_postfix_reachable_dir,
    postfix_available,
)

__all__ = ["PostfixFactory", "postfix_factory", "require_postfix"]

_SKIP_BANNER = "END-TO-END POSTFIX TEST SKIPPED: "


def require_postfix() -> None:
    """Skip (loudly) or fail the current test when no throwaway Postfix can run here.

    On CI (``CI=true``) a missing Postfix is a failure: the end-to-end tests are the only
    proof that the policy server speaks to the real smtpd correctly, so they must not be
    silently skipped there.  Locally a skip with a shouty reason is enough (``-ra`` shows it).
    """
    reason = postfix_available()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"end-to-end Postfix tests cannot run under CI=true: {reason}")
    pytest.skip(_SKIP_BANNER + reason)


class PostfixFactory:
    """Creates throwaway Postfix instances and guarantees they are stopped at teardown.

    Calling the factory returns an unstarted instance (starting blocks for about a second,
    which the caller should do off the trio loop, see ``start``).  ``socket_dir()`` gives a
    short directory Postfix's unprivileged smtpd can reach, for unix-socket policy servers.
    """

    def __init__(self, tmp_path: pathlib.Path) -> None:
        self._tmp_path = tmp_path
        self._instances: list[PostfixInstance] = []
        self._dirs: list[pathlib.Path] = []

    def __call__(
        self,
        *,
        policy_endpoint: str,
        relay_domains: Sequence[str] = ("example.com",),
        extra_restrictions_before: Sequence[str] = (),
        policy_options: str = "timeout=10s, try_limit=1, default_action=DUNNO",
    ) -> PostfixInstance:
        instance = make_postfix(
            self._tmp_path,
            policy_endpoint=policy_endpoint,
            relay_domains=list(relay_domains),
            extra_restrictions_before=extra_restrictions_before,
            policy_options=policy_options,
        )
        self._instances.append(instance)
        return instance

    async def start(self, **kwargs: Any) -> PostfixInstance:
        """Create (same arguments as calling the factory) and start an instance in a
        worker thread, so the trio loop keeps running."""
        instance = self(**kwargs)
        await trio.to_thread.run_sync(instance.start)
        return instance

    def socket_dir(self) -> pathlib.Path:
        """A fresh short directory (mode 0755) for a policy server's unix socket.

        The socket inside must also be made writable for the mail_owner (chmod 0666),
        since smtpd connects as that user, not as root.
        """
        path = make_postfix_reachable_dir(self._tmp_path, prefix="ps")
        self._dirs.append(path)
        return path

    def stop_all(self) -> None:
        """Stop every instance created here (newest first), then remove socket dirs."""
        errors: list[BaseException] = []
        for instance in reversed(self._instances):
            try:
                instance.stop()
            except Exception as exc:  # keep stopping the others; report afterwards
                errors.append(exc)
        for path in self._dirs:
            shutil.rmtree(path, ignore_errors=True)
        if errors:
            raise errors[0]


def postfix_factory(tmp_path: pathlib.Path) -> Iterator[PostfixFactory]:
    """Fixture body: ``postfix_factory = pytest.fixture(pytest_postfix.postfix_factory)``.

    Calls ``require_postfix()`` first so any test using it skips/fails with the reason.
    The teardown is synchronous on purpose: pytest-trio runs sync fixture teardown after
    the test's trio loop has finished, when blocking on ``postfix stop`` harms nobody.
    """
    require_postfix()
    factory = PostfixFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.stop_all()
