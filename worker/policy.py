# ruff: noqa: E501 -- the policy table reads best unwrapped
"""The ack / retry / dead-letter policy, written once.

| what happened                      | retried?            | reply             | dead letter      | ack |
|------------------------------------|---------------------|-------------------|------------------|-----|
| body over IDENTITY_MAX_MESSAGE_BYTES | no, never parsed  | malformed_message | too_large        | yes |
| content_type not application/json | no, never parsed    | malformed_message | wrong_content_type | yes |
| delivered worker_delivery_limit    | no: it keeps        | internal_error    | delivery_limit   | yes |
|   times already                    |   crashing workers  |                   |                  |     |
| not JSON / not an object           | no                  | malformed_message | malformed_json,  | yes |
|                                    |                     |                   | not_an_object    |     |
| no usable idempotency key          | no                  | malformed_message | -                | yes |
| unknown routing key                | no                  | unknown_command   | -                | yes |
| envelope or payload invalid        | no                  | validation_failed | -                | yes |
| beyond the caller's rate           | no, nothing ran     | rate_limited with | -                | yes |
|   (IDENTITY_CALLER_RATES)          |   and nothing stored|   retry_after_s   |                  |     |
| business rule said no              | no (stored reply)   | the stored error  | -                | yes |
| database fault                     | yes, back-off with  | internal_error    | retries_exhausted| yes |
|   (TransientStoreError)            |   jitter, bounded   |   once exhausted  |                  |     |
| unexpected exception (a bug)       | no                  | internal_error    | unexpected_error | yes |
| broker fault replying or acking    | reply retried, then | stored reply on   | -                | no  |
|                                    |   broker redelivers |   redelivery      |                  |     |
| worker killed mid-way              | broker redelivers   | stored reply      | -                | no  |
| success                            | -                   | the result        | -                | yes |

The worker's own delivery limit is below the queue's `x-delivery-limit`, so the broker's
backstop (which would dead-letter the raw body, passwords included) never fires first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from stores import TransientStoreError


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 5
    max_delay_s: float = 5.0
    # However many attempts are left, stop retrying after this long: the delivery then
    # gets `internal_error` rather than holding its slot forever.
    deadline_s: float = 60.0

    def retrying(self, on_retry: Callable[[RetryCallState], None] | None = None) -> AsyncRetrying:
        """A tenacity controller that retries transient database faults only."""
        return AsyncRetrying(
            retry=retry_if_exception_type(TransientStoreError),
            stop=stop_after_attempt(self.attempts) | stop_after_delay(self.deadline_s),
            wait=wait_exponential_jitter(multiplier=0.05, max=self.max_delay_s),
            before_sleep=on_retry,
            reraise=True,
        )
