"""`maecli serve`: a local web page over one model: reconstructions under a mask slider, the run's training
progress, and nearest neighbours in an image folder. FastAPI and uvicorn come with the `serve` extra and load
only on first use (in app.py and process.py); the page itself is static files in page/ that fetch nothing else.

Nothing is computed differently from the commands: reconstructions are `reconstruct()` + `render()` (the PNG
`maecli reconstruct` writes, byte for byte), and neighbours come from `maecli.embed` vectors.

  errors.py   Refused (a status and a reason for the page), the extra's check
  folder.py   what may be read: --images files by relative path, the run's previews and metrics
  images.py   uploads and folder files in, as `maecli reconstruct` reads a file; thumbnails
  index.py    the folder's embeddings, built in the background and cached on disk; the search
  server.py   Server: the model, its lock, the caches, the three features
  guard.py    which requests may reach the API: refusing what other web sites send through the browser
  app.py      the routes (create_app)
  process.py  listen and serve: the socket, uvicorn, Ctrl-C
  page/       index.html, app.js, style.css: the page, static files shipped with the package
"""

from .app import create_app
from .errors import EXTRA_HINT, MissingExtra, Refused, require_extra
from .folder import Folder, check_relative, inside
from .index import Index
from .process import listen, serve
from .server import Server

__all__ = [
    "EXTRA_HINT",
    "Folder",
    "Index",
    "MissingExtra",
    "Refused",
    "Server",
    "check_relative",
    "create_app",
    "inside",
    "listen",
    "require_extra",
    "serve",
]
