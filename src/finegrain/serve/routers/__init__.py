"""The server's routes, by kind: the task endpoints (`tasks`), generation (`generation`) and what
the server tells about itself (`about`); `finegrain.serve.app` includes them."""
