"""Start-up code for ``h5watch run``; see ``sitecustomize``."""
