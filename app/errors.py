"""The one exception tree of realign-serve.

::

    RealignError                      base: every error we raise on purpose
    ├── InputError                    bad request content               -> 400 / 422
    │   ├── EmptyInputError
    │   ├── TooManyInputsError                                          -> 413
    │   └── AlignmentInputError       zero / non-finite rows for the transform
    ├── AuthError                     missing or wrong API key          -> 401
    ├── NotFoundError                 unknown profile or model          -> 404
    ├── OverloadError                 queue full                        -> 429 + Retry-After
    ├── NotReadyError                 model not loaded / worker down    -> 503
    ├── ProfileError                  a profile file is invalid, or built for another encoder
    ├── EncoderError                  the model failed (load or forward) -> 500
    └── CacheError                    Redis failed; callers treat it as a miss

Third-party exceptions are translated where the library is called, always ``raise ... from``.
The HTTP layer maps classes to status codes in one place (``app/api/errors.py``).
"""

from __future__ import annotations


class RealignError(Exception):
    """Base class. ``code`` is a short machine-readable identifier sent to clients."""

    code: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InputError(RealignError):
    code = "invalid_input"


class EmptyInputError(InputError):
    code = "empty_input"


class TooManyInputsError(InputError):
    code = "too_many_inputs"


class AlignmentInputError(InputError):
    """Rows that cannot be aligned (zero or non-finite); ``rows`` names them."""

    code = "invalid_embedding"

    def __init__(self, message: str, rows: list[int]) -> None:
        super().__init__(message)
        self.rows = rows


class AuthError(RealignError):
    code = "invalid_api_key"


class NotFoundError(RealignError):
    code = "not_found"


class OverloadError(RealignError):
    code = "overloaded"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReadyError(RealignError):
    code = "not_ready"


class ProfileError(RealignError):
    code = "invalid_profile"


class EncoderError(RealignError):
    code = "encoder_error"


class CacheError(RealignError):
    code = "cache_error"
