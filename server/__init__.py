"""What runs on a GPU node, and how others find it: engine commands, the server job, the registry."""
