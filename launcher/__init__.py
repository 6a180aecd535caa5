"""sdeefs launcher: the isolated login and job environments (installed as ``sdeefs.launcher``)."""
