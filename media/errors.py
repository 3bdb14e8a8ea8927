"""The media package's one exception family.

Each class names a kind of caller-side problem; the service maps classes to HTTP statuses
(the media package knows nothing about HTTP responses). Messages are shown to the caller, so
they say what was wrong and what the caller can do about it.
"""


class MediaError(Exception):
    """Base class: the input media could not be used."""


class InvalidSource(MediaError):
    """The source itself is unusable: malformed URL, unsupported scheme, empty upload."""


class RefusedAddress(InvalidSource):
    """The URL's host is, or resolves to, an address the service does not fetch from."""


class SegmentOutsideVideo(InvalidSource):
    """The requested time segment holds no frame: it starts at or past the end of the video, or
    falls between two frames. The request does not fit this video (like a bad source, a 400)."""


class MediaTooLarge(MediaError):
    """A size limit was exceeded: bytes downloaded or uploaded, pixels, duration."""


class UnsupportedMedia(MediaError):
    """Not a kind of media we read: not a video or image, no video stream, unsupported codec."""


class UndecodableMedia(MediaError):
    """Recognised media that cannot be decoded: corrupt, truncated, empty, no decodable frames."""


class DecodeTimeout(UndecodableMedia):
    """Decoding did not finish within the time limit (the decoder was stopped)."""


class DecoderStopped(MediaError):
    """The decoding process was killed from outside twice in one call (out of memory, an
    operator): the service's trouble, not the file's."""


class UpstreamError(MediaError):
    """The origin server could not be reached or did not deliver (DNS, refused, HTTP 4xx/5xx)."""


class UpstreamTimeout(UpstreamError):
    """The origin server was too slow: connect, read or total download time exceeded."""


class UnknownMedia(MediaError):
    """A media id the store does not hold: never uploaded, expired, evicted or deleted (a 404)."""


class WrongMediaKind(UnsupportedMedia):
    """A stored medium of the other kind: an image's id where a video goes, or the reverse (the
    status an uploaded file of the other kind gets there)."""


class StoreUnavailable(MediaError):
    """The media store's records cannot be reached (Redis down): the service's trouble, a 503."""
