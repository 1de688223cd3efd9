"""t2i-core's own plugins, registered through the ``t2i`` entry points like any third party's."""
