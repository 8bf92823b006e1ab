"""Names and numbers the consumer package shares: the file format's, the hub's, and every environment
variable it reads. Standard library only; nothing of ours."""

from __future__ import annotations

# -- the condensed-set file ---------------------------------------------------------------------------------
FORMAT_VERSION = 1
STORAGE_FORMAT_VERSION = 2  # files whose images are stored as uint8 pixels or kept patches (metadata "storage")
SUPPORTED_FORMAT_VERSIONS = frozenset({1, 2})
METADATA_KEY = "condensed_datasets"  # the one safetensors metadata key, holding sorted JSON
HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own limit on a file's JSON header, in bytes
SET_SUFFIX = ".safetensors"
IPC_LIMIT = 10**9  # ipcs are below this: a set's file name ({method}_ipc{ipc}) holds at most 9 digits

# -- methods, in the order listings show them, with their display names ------------------------------------
METHOD_DISPLAY_NAMES = {
    "random": "Random real", "herding": "Herding", "kcenter": "K-Center", "dd": "DD", "dc": "DC",
    "dsa": "DSA", "dm": "DM", "mtt": "MTT", "datm": "DATM", "dq": "DQ",
}
#: The methods whose sets this package reads, publishes and lists.
METHODS = tuple(METHOD_DISPLAY_NAMES)
#: A set made by a method of the user's own (not one of METHODS) is named ``user_<name>``.
USER_METHOD_PREFIX = "user_"

# -- the hub ------------------------------------------------------------------------------------------------
DEFAULT_ORG = "condensed-datasets"
HUB_INDEX_NAME = "index.json"  # a repository's (or published folder's) listing of its sets
INDEX_LIMIT = 64 * 1024 * 1024  # the largest index.json read, in bytes (chosen here: an entry is under 1 KiB)
HUB_INDEX_VERSION = 1
CARD_NAME = "README.md"
DEFAULT_REVISION = "main"
REPO_TYPE = "dataset"
LOCK_TIMEOUT_S = 600.0
#: A download that makes less than MIN_DOWNLOAD_RATE bytes/s on average over MIN_DOWNLOAD_WINDOW_S seconds is
#: aborted (as curl's --speed-limit / --speed-time); the environment variables below change both.
MIN_DOWNLOAD_RATE = 1024
MIN_DOWNLOAD_WINDOW_S = 60.0

# -- files this package writes ------------------------------------------------------------------------------
#: An atomic write's temporary file (``.{name}.{random}.tmp``) older than this is a killed writer's leftover;
#: the next write of the same name removes it.
STALE_TEMP_AGE_S = 3600.0

# -- environment variables read by the package --------------------------------------------------------------
ORG_ENV = "CONDENSED_DATASETS_ORG"  # the hub organisation of the default repositories
EMBEDDED_DIR_ENV = "CONDENSED_DATASETS_EMBEDDED_DIR"  # another folder of embedded sets (tests)
FASHION_MNIST_ENV = "CONDENSED_FASHION_MNIST_DIR"  # the gzipped Fashion-MNIST IDX files
MIN_DOWNLOAD_RATE_ENV = "CONDENSED_DATASETS_MIN_DOWNLOAD_RATE"  # bytes/s (0: no limit)
MIN_DOWNLOAD_WINDOW_ENV = "CONDENSED_DATASETS_MIN_DOWNLOAD_WINDOW"  # seconds
SYSTEM_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist puts them
