"""The Ray shell (runner: the only module of quantray that imports ray) and the plain worker class
it runs in each actor (worker), which tests drive without Ray."""
