"""Django settings for the SDXL LoRA service.

Every setting an operator may change comes from the environment (django-environ); the
README's configuration table lists them all.
"""

from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import django_stubs_ext
import environ
from django.core.exceptions import ImproperlyConfigured

# Lets the classes django-stubs types as generic (ModelAdmin[Owner], ModelForm[ApiToken]) be
# subscripted at run time too, before any app module is imported.
django_stubs_ext.monkeypatch()

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
env.read_env(BASE_DIR / ".env")  # optional; real environment variables win

# --- Storage ---------------------------------------------------------------------------
# The data dir holds the session folders (the storage layout of docs/api.md), the SQLite
# database by default, generated images and the cached random-weight test models.
DATA_DIR = Path(env.str("SDXL_DATA_DIR", default=str(BASE_DIR / "media"))).resolve()
SESSION_DATA_DIR = DATA_DIR / "session_data"
GENERATIONS_DIR = DATA_DIR / "generations"
# Random-weight test models are written here once; several data dirs may share one.
MODEL_CACHE_DIR = Path(env.str("SDXL_MODEL_CACHE_DIR", default=str(DATA_DIR / "models"))).resolve()

# --- Core Django ---------------------------------------------------------------------
DEBUG = env.bool("DJANGO_DEBUG", default=False)
SECRET_KEY = env.str(
    "DJANGO_SECRET_KEY",
    # Good enough for a loopback-only development server; production sets its own. The
    # "django-insecure-" prefix makes `manage.py check --deploy` flag it.
    default="django-insecure-development-key-set-DJANGO_SECRET_KEY-in-production",
)
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]"])

# --- HTTPS ---------------------------------------------------------------------------------
# DJANGO_HTTPS says clients reach the service over HTTPS (gunicorn behind a TLS proxy):
# plain HTTP is redirected, cookies (the admin's) travel only over HTTPS, and browsers are
# told to keep to HTTPS (HSTS). Off by default: `serve` itself speaks plain HTTP.
SDXL_HTTPS = env.bool("DJANGO_HTTPS", default=False)
SECURE_SSL_REDIRECT = SDXL_HTTPS
SESSION_COOKIE_SECURE = SDXL_HTTPS
CSRF_COOKIE_SECURE = SDXL_HTTPS
SECURE_HSTS_SECONDS = env.int("DJANGO_HSTS_SECONDS", default=365 * 24 * 3600 if SDXL_HTTPS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("DJANGO_HSTS_INCLUDE_SUBDOMAINS", default=SDXL_HTTPS)
SECURE_HSTS_PRELOAD = env.bool("DJANGO_HSTS_PRELOAD", default=SDXL_HTTPS)
SDXL_BEHIND_PROXY = env.bool("DJANGO_BEHIND_PROXY", default=False)
if SDXL_BEHIND_PROXY:
    # The proxy terminates TLS and says so in this header; trust it only behind one.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

# --- Admin login limit (django-axes; README, Security) -------------------------------------
# After SDXL_ADMIN_LOGIN_FAILURES failed logins of one username from one address, that
# pair is refused (429, even with the right password) for SDXL_ADMIN_LOGIN_COOLOFF_MINUTES;
# a success forgets the failures. Username and address together: an attacker elsewhere
# cannot lock the operator out. The API's bearer tokens never pass through Django's
# authenticate(), so they are not counted or refused here.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env.int("SDXL_ADMIN_LOGIN_FAILURES", default=5)
AXES_COOLOFF_TIME = timedelta(minutes=env.int("SDXL_ADMIN_LOGIN_COOLOFF_MINUTES", default=15))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
# Its start-up banner would otherwise open the output of every manage.py command.
AXES_VERBOSE = False
# The address is REMOTE_ADDR, which a client cannot forge; behind the proxy
# (DJANGO_BEHIND_PROXY) every request comes from the proxy, so the address is the one it
# appended last to X-Forwarded-For (access_app.client_ip).
AXES_CLIENT_IP_CALLABLE = "access_app.client_ip.client_ip"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_q",
    "axes",
    "access_app",
    "sessions_app",
    "training_app",
    "datadir_app",
]

MIDDLEWARE = [
    # First: it sees every streaming answer, WhiteNoise's included.
    "sdxl_service.web_requests.streaming_in_parts",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: it turns a refused admin login into the lockout answer.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "sdxl_service.urls"
WSGI_APPLICATION = "sdxl_service.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        # The front door, and drf-spectacular's Redoc page without its web fonts.
        "DIRS": [BASE_DIR / "sdxl_service" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database --------------------------------------------------------------------------
DATABASES = {"default": env.db_url("DATABASE_URL", default=f"sqlite:///{DATA_DIR / 'db.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # SQLite creates the file but not its folder: any first command (migrate, serve,
    # createsuperuser) on a fresh data dir must work.
    if DATABASES["default"]["NAME"] not in ("", ":memory:"):
        Path(DATABASES["default"]["NAME"]).parent.mkdir(parents=True, exist_ok=True)
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            # IMMEDIATE takes the write lock when a transaction starts, so the per-session
            # lock (a write transaction) serialises web and worker processes instead of
            # failing late with "database is locked"; WAL lets readers run meanwhile.
            "transaction_mode": "IMMEDIATE",
            # How long a write waits for another's lock before "database is locked". Workers
            # wait long: their writes (progress, results) must not be lost to a slow
            # neighbour. The web server waits SDXL_WEB_DB_LOCK_TIMEOUT instead (sdxl_service.wsgi).
            "timeout": env.float("SDXL_SQLITE_TIMEOUT", default=30.0),
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )

# How long a request of the web server waits for a database lock another connection holds
# (SQLite's busy timeout, PostgreSQL's lock_timeout) before it answers 503 "the database is
# busy" with Retry-After: a client waiting 30 s for a generic error learns nothing, and
# every waiting request holds one of the web server's threads. A write holds the lock for
# milliseconds (an upload: its two files written and fsynced), so even a burst of 64
# uploads at once (every web thread) queues for a few seconds on a slow disk; 10 s leaves
# room for that and runs out only for a database held by something else (a backup, a
# migration, an outside `BEGIN IMMEDIATE`). SQLite's waiters retry rather than queue in
# order, so a much shorter wait would refuse some writes of a legitimate burst.
SDXL_WEB_DB_LOCK_TIMEOUT = env.float("SDXL_WEB_DB_LOCK_TIMEOUT", default=10.0)

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
# The admin's CSS and JS are served by WhiteNoise straight from the installed apps,
# so `serve` needs no collectstatic step.
WHITENOISE_USE_FINDERS = True

# --- Request limits ------------------------------------------------------------------
# Images and LoRA files travel base64-encoded inside JSON bodies. DRF (3.17.2 on) parses
# JSON from `request.body`, where Django enforces this limit: larger bodies answer 413.
DATA_UPLOAD_MAX_MEMORY_SIZE = env.int("SDXL_MAX_BODY_MB", default=64) * 1024 * 1024

# --- REST API ----------------------------------------------------------------------------
# API tokens from the environment (comma-separated), besides those created in the admin.
# While any token exists, every API endpoint needs `Authorization: Bearer <token>`.
SDXL_API_TOKENS = [token for token in env.list("SDXL_API_TOKENS", default=[]) if token]
# Owners' quotas (README, Security), each overridable per owner in the admin; 0: no limit.
SDXL_QUOTA_SESSIONS = env.int("SDXL_QUOTA_SESSIONS", default=0)
SDXL_QUOTA_IMAGES_PER_SESSION = env.int("SDXL_QUOTA_IMAGES_PER_SESSION", default=0)
SDXL_QUOTA_STORED_MB = env.int("SDXL_QUOTA_STORED_MB", default=0)
SDXL_QUOTA_CONCURRENT_TRAININGS = env.int("SDXL_QUOTA_CONCURRENT_TRAININGS", default=0)
SDXL_QUOTA_GENERATIONS_PER_MINUTE = env.int("SDXL_QUOTA_GENERATIONS_PER_MINUTE", default=0)
SDXL_QUOTA_QUEUED_GENERATIONS = env.int("SDXL_QUOTA_QUEUED_GENERATIONS", default=0)
# Generations queued at once, every owner's together (0: no bound): more answers 429 with
# Retry-After. 200 is minutes of work at one image a second, while a /txt2img waits at most
# SDXL_TXT2IMG_TIMEOUT for its images.
SDXL_MAX_QUEUED_GENERATIONS = env.int("SDXL_MAX_QUEUED_GENERATIONS", default=200)
# How long an Idempotency-Key is kept with its answer (Stripe's 24 h).
SDXL_IDEMPOTENCY_KEY_HOURS = env.int("SDXL_IDEMPOTENCY_KEY_HOURS", default=24)

REST_FRAMEWORK = {
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["sdxl_service.api.parsers.JSONParser"],
    "DEFAULT_AUTHENTICATION_CLASSES": ["access_app.authentication.BearerTokenAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["access_app.permissions.ApiTokenWhenConfigured"],
    "UNAUTHENTICATED_USER": "access_app.callers.open_caller",
    "EXCEPTION_HANDLER": "sdxl_service.api.errors.api_exception_handler",
    "DEFAULT_SCHEMA_CLASS": "sdxl_service.api.schema.ScopedAutoSchema",
}

# The OpenAPI description at /api/schema and its pages at /api/docs and /api/redoc; the
# pages' scripts are served from here (sidecar), so they work offline.
_SYSTEM_FONTS = 'system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif'
_MONOSPACE_FONTS = 'ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace'
SPECTACULAR_SETTINGS = {
    "TITLE": "SDXL LoRA service",
    "DESCRIPTION": (
        "Trains LoRA adapters for Stable Diffusion XL from captioned images and generates "
        "images with SDXL Base + Refiner. The nine endpoints of the original service keep "
        "their shapes; responses may carry extra keys. Every error answers "
        '`{"status": "error", "message": "..."}`. `session_id` is accepted as an integer '
        "or a string of digits; every path also works with a trailing slash."
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "PREPROCESSING_HOOKS": ["sdxl_service.api.schema.schema_without_slashed_duplicates"],
    # Each response's "status" is one constant; name each enum after it.
    "ENUM_NAME_OVERRIDES": {
        "RefinerPolicyEnum": "sdxl_engine.parameters.REFINER_POLICIES",
        "PromptSyntaxEnum": "sdxl_engine.prompt_syntax.PROMPT_SYNTAXES",
        **{
            f"{name}StatusEnum": [value]
            for name, value in (
                ("Success", "success"),
                ("Deleted", "deleted"),
                ("Started", "started"),
                ("InProgress", "in-progress"),
                ("Completed", "completed"),
                ("Error", "error"),
                ("None", "none"),
                ("Cancelled", "cancelled"),
            )
        },
    },
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Nothing is loaded from outside the service: Swagger UI's validator badge
    # (validator.swagger.io) is off, and Redoc uses system fonts instead of Google Fonts
    # (templates/drf_spectacular/redoc.html drops the font links).
    "SWAGGER_UI_SETTINGS": {"deepLinking": True, "validatorUrl": None},
    "REDOC_UI_SETTINGS": {
        "theme": {
            "typography": {
                "fontFamily": _SYSTEM_FONTS,
                "headings": {"fontFamily": _SYSTEM_FONTS},
                "code": {"fontFamily": _MONOSPACE_FONTS},
            }
        }
    },
    # Swagger UI fills its example bodies from these: 64-bit integers get safe examples.
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "sdxl_service.api.schema.schema_with_safe_integer_examples",
        "sdxl_service.api.schema.schema_with_common_errors",
    ],
}

# --- Models -------------------------------------------------------------------------------
SDXL_MODEL_PRESET = env.str("SDXL_MODEL_PRESET", default="")
SDXL_BASE_MODEL = env.str("SDXL_BASE_MODEL", default="stabilityai/stable-diffusion-xl-base-1.0")
SDXL_REFINER_MODEL = env.str(
    "SDXL_REFINER_MODEL", default="stabilityai/stable-diffusion-xl-refiner-1.0"
)
# The segmentation model of POST /sessions/<id>/masks {"kind": "subject"}: a hub id or
# local folder of a CLIPSeg model (e.g. CIDAS/clipseg-rd64-refined), run in the web process
# on its CPU. Empty: the tiny preset builds a tiny random one (noise masks); any other
# preset answers subject masks with a 409 naming this setting.
SDXL_SUBJECT_MASK_MODEL = env.str("SDXL_SUBJECT_MASK_MODEL", default="")
# A CLIP vision model with projection (hub id or local folder) that scores each checkpoint's
# samples against the photos (/train_status' similarity). Empty: no similarity, but on the
# tiny preset, which builds a tiny random one (its scores mean nothing).
SDXL_SIMILARITY_MODEL = env.str("SDXL_SIMILARITY_MODEL", default="")
# Compile the UNets whole with CUDA graphs in the workers (GPU): faster steps, paid for with
# compile time at the generation worker's start (one image of the native size; other
# shapes run eagerly).
SDXL_COMPILE = env.bool("SDXL_COMPILE", default=False)
# Replay each UNet step of the shapes nothing compiled (every shape without SDXL_COMPILE)
# from a CUDA graph of the eager UNet, captured on the shape's first request (GPU).
SDXL_CUDA_GRAPHS = env.bool("SDXL_CUDA_GRAPHS", default=True)
# The generation worker runs queued requests that differ only in prompts, seed and image
# count (same size, steps, guidance, LoRA and scale) as one batch of up to this many
# images; 1 turns batching off. It pays where a batch costs less per image than one image
# does: with CUDA graphs alone (H200, 1024²: 1.17 s per image at batch 4 against about
# 1.4 s alone), not with SDXL_COMPILE, whose compiled single image (1.06 s) beats both
# (docs/benchmarks.md).
SDXL_GENERATION_BATCH_IMAGES = env.int(
    "SDXL_GENERATION_BATCH_IMAGES", default=1 if SDXL_COMPILE else 4
)
# Low-memory training (gradient checkpointing; text encoders and VAE in CPU memory while
# the UNet trains): "auto" turns it on when the GPU has too little free memory to keep
# every activation (a 16-24 GB card), "on"/"off" force it.
SDXL_LOW_MEMORY = env.str("SDXL_LOW_MEMORY", default="auto")
if SDXL_LOW_MEMORY not in ("auto", "on", "off"):
    raise ImproperlyConfigured("SDXL_LOW_MEMORY must be auto, on or off")
SDXL_GPUS = env.list("SDXL_GPUS", default=[])
# The image-to-text model that writes captions (POST /sessions/<id>/captions, a caption
# "auto" at upload): a hub id or a local folder of a transformers captioner (BLIP, BLIP-2);
# it runs in the web process, on the CPU. Empty: none, except with the tiny model preset,
# which builds a tiny random captioner (nonsense captions) so the path runs offline.
SDXL_CAPTION_MODEL = env.str("SDXL_CAPTION_MODEL", default="")

# --- Limits on what the API accepts --------------------------------------------------
SDXL_MAX_IMAGE_SIDE = env.int("SDXL_MAX_IMAGE_SIDE", default=2048)
SDXL_MAX_NUM_IMAGES = env.int("SDXL_MAX_NUM_IMAGES", default=8)
SDXL_MAX_TRAINING_STEPS = env.int("SDXL_MAX_TRAINING_STEPS", default=100_000)
SDXL_MAX_PROMPT_CHARS = env.int("SDXL_MAX_PROMPT_CHARS", default=2000)
SDXL_MAX_UPLOAD_PIXELS = env.int("SDXL_MAX_UPLOAD_PIXELS", default=40_000_000)
# Decoding costs memory and CPU by the pixel (README, Security): a request's images in all
# (a zip's included, read from their headers first), and the pixels one web process
# decodes at once (more waits its turn).
SDXL_MAX_UPLOAD_TOTAL_PIXELS = env.int("SDXL_MAX_UPLOAD_TOTAL_PIXELS", default=500_000_000)
SDXL_DECODE_PIXEL_BUDGET = env.int("SDXL_DECODE_PIXEL_BUDGET", default=80_000_000)
# Defaults obey these limits as given values do: a request that leaves a value out gets
# the default capped at the limit (height and width: min(1024, SDXL_MAX_IMAGE_SIDE) rounded
# down to a multiple of 8; a training run's length: at most SDXL_MAX_TRAINING_STEPS steps).
# A limit below the smallest value the API takes would refuse every request: refused here.
for _name, _smallest in (
    ("SDXL_MAX_IMAGE_SIDE", 64),
    ("SDXL_MAX_NUM_IMAGES", 1),
    ("SDXL_MAX_TRAINING_STEPS", 1),
    ("SDXL_MAX_PROMPT_CHARS", 1),
    ("SDXL_MAX_UPLOAD_PIXELS", 1),
    ("SDXL_MAX_UPLOAD_TOTAL_PIXELS", 1),
    ("SDXL_DECODE_PIXEL_BUDGET", 1),
):
    if globals()[_name] < _smallest:
        raise ImproperlyConfigured(f"{_name} must be at least {_smallest}")
# Webhooks (training_app.services.webhooks): off unless both are set. Hosts as Django's
# ALLOWED_HOSTS lists them ("hooks.example.com", ".example.com" for its subdomains).
SDXL_WEBHOOK_ALLOWED_HOSTS = env.list("SDXL_WEBHOOK_ALLOWED_HOSTS", default=[])
SDXL_WEBHOOK_SECRET = env.str("SDXL_WEBHOOK_SECRET", default="")
SDXL_WEBHOOK_MAX_ATTEMPTS = env.int("SDXL_WEBHOOK_MAX_ATTEMPTS", default=6)
SDXL_WEBHOOK_RETRY_BASE_S = env.float("SDXL_WEBHOOK_RETRY_BASE_S", default=5.0)
# Event streams (GET /runs/<id>/events): a heart-beat comment this often, and how often the
# web process reads new events for its open streams.
SDXL_EVENTS_HEARTBEAT_S = env.float("SDXL_EVENTS_HEARTBEAT_S", default=15.0)
SDXL_EVENTS_POLL_S = env.float("SDXL_EVENTS_POLL_S", default=0.5)
# Each attempt's whole exchange (connect, request, the answer's headers) must end within
# this many seconds, however slowly the receiver trickles bytes.
SDXL_WEBHOOK_TIMEOUT = env.float("SDXL_WEBHOOK_TIMEOUT", default=10.0)
# Deliveries sent at once by each worker process, and at most this many to one host (across
# the workers): a slow receiver holds its own share of the threads, never all of them.
SDXL_WEBHOOK_CONCURRENCY = env.int("SDXL_WEBHOOK_CONCURRENCY", default=4)
SDXL_WEBHOOK_PER_HOST = env.int("SDXL_WEBHOOK_PER_HOST", default=2)
# Hosts that resolve to private, loopback, link-local, shared or reserved addresses are
# refused (cloud metadata addresses always): true for receivers on a private network.
SDXL_WEBHOOK_ALLOW_PRIVATE = env.bool("SDXL_WEBHOOK_ALLOW_PRIVATE", default=False)
for _name in ("SDXL_WEBHOOK_TIMEOUT", "SDXL_WEBHOOK_CONCURRENCY", "SDXL_WEBHOOK_PER_HOST"):
    if globals()[_name] <= 0:
        raise ImproperlyConfigured(f"{_name} must be positive")
# Multipart uploads (images, zips, LoRA files): at most this many MB of files per request,
# and of what a zip unpacks to.
SDXL_MAX_UPLOAD_MB = env.int("SDXL_MAX_UPLOAD_MB", default=512)
FILE_UPLOAD_HANDLERS = [
    "sdxl_service.api.parsers.UploadLimitHandler",
    "django.core.files.uploadhandler.MemoryFileUploadHandler",
    "django.core.files.uploadhandler.TemporaryFileUploadHandler",
]
# How long /txt2img waits for its image before answering 504.
SDXL_TXT2IMG_TIMEOUT = env.float("SDXL_TXT2IMG_TIMEOUT", default=600.0)

# --- Workers (django-q2) ---------------------------------------------------------------
# Two queues, each served by its own cluster, so generation never waits behind a
# training run. The namespace keeps several deployments (or test runs) on one Redis apart.
SDXL_QUEUE_NAMESPACE = env.str("SDXL_QUEUE_NAMESPACE", default="sdxl")
TRAINING_QUEUE = f"{SDXL_QUEUE_NAMESPACE}-training"
GENERATION_QUEUE = f"{SDXL_QUEUE_NAMESPACE}-generation"
# A worker counts as alive while its heartbeat is younger than this.
SDXL_WORKER_STALE_AFTER = env.float("SDXL_WORKER_STALE_AFTER", default=15.0)
# A running training run whose heartbeat is older than this lost its worker (killed, out of
# memory, machine gone): workers then queue it again to resume (SDXL_TRAINING_MAX_RESUMES).
# The job's process beats four times per period, loading a model included.
SDXL_RUN_STALE_AFTER = env.float("SDXL_RUN_STALE_AFTER", default=60.0)
# A run whose worker was lost is queued again, to resume from its last checkpoint, at most
# this many times; then it ends in error.
SDXL_TRAINING_MAX_RESUMES = env.int("SDXL_TRAINING_MAX_RESUMES", default=3)
SDXL_TRAINING_TIMEOUT = env.int("SDXL_TRAINING_TIMEOUT", default=6 * 3600)
SDXL_GENERATION_TIMEOUT = env.int("SDXL_GENERATION_TIMEOUT", default=900)

REDIS_URL = env.str("REDIS_URL", default="")

Q_CLUSTER = {
    "name": SDXL_QUEUE_NAMESPACE,
    "cluster_name": TRAINING_QUEUE,
    # One job at a time per queue and GPU: pipelines stay loaded in the worker process.
    "workers": 1,
    "recycle": 10_000,
    "timeout": SDXL_TRAINING_TIMEOUT,
    # Redelivery only after the timeout has passed, never while the job still runs.
    "retry": SDXL_TRAINING_TIMEOUT + 300,
    "max_attempts": 1,
    "ack_failures": True,
    "scheduler": False,
    "ALT_CLUSTERS": {
        GENERATION_QUEUE: {
            "timeout": SDXL_GENERATION_TIMEOUT,
            "retry": SDXL_GENERATION_TIMEOUT + 60,
        },
    },
}
if REDIS_URL:
    # A Redis that does not answer (its host down, its process stopped) fails an enqueue
    # within seconds, answered 503, rather than holding a web thread for the system's TCP
    # timeouts (minutes). Longer than the workers' 1 s blocking reads; a URL that sets
    # these keeps its own.
    _redis_url = urlsplit(REDIS_URL)
    _redis_options = {"socket_connect_timeout": "5", "socket_timeout": "10"}
    _redis_options |= dict(parse_qsl(_redis_url.query))
    Q_CLUSTER["redis"] = _redis_url._replace(query=urlencode(_redis_options)).geturl()
else:
    Q_CLUSTER["orm"] = "default"
    Q_CLUSTER["poll"] = 0.2

# --- Logging ---------------------------------------------------------------------------------
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"}
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("SDXL_LOG_LEVEL", default="INFO")},
}
