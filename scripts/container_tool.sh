# Sourced by build_image.sh and push_image.sh: the container tool to use.
# pick_container_tool NAME prints "docker" when a Docker engine answers, else "buildah";
# with neither it says so as NAME and returns 2.
pick_container_tool() {
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    echo docker
  elif command -v buildah >/dev/null; then
    echo buildah
  else
    echo "$1: neither a Docker engine nor buildah is available" >&2
    return 2
  fi
}
