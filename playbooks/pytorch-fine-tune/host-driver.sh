# Make the NVIDIA driver visible to Nix-built CUDA programs.
#
# Nix-built CUDA libraries look for libcuda.so.1 in /run/opengl-driver/lib (their RUNPATH), which
# NixOS fills from the installed driver. Ubuntu and DGX OS keep the driver elsewhere. There, link
# only the driver's own libraries (libcuda, libnvidia-*, ...) into a private directory and put that
# first on LD_LIBRARY_PATH, so no other host library (glibc, libstdc++) gets mixed in. This is what
# nix-gl-host does; nixpkgs does not package nix-gl-host at the pinned revision.
#
# Triton compiles a small launcher against libcuda.so.1 at run time and finds it with
# `/sbin/ldconfig -p`, which NixOS does not have: TRITON_LIBCUDA_PATH names the directory instead
# (unless already set).
#
# Settings (environment variables):
#   LLM_FINETUNE_NO_HOST_DRIVER=1     do nothing
#   LLM_FINETUNE_DRIVER_SEARCH_PATH   colon-separated directories to look for libcuda.so.1 in
#   LLM_FINETUNE_DRIVER_LINK_DIR      where to put the links (default ~/.cache/llm-finetune/host-driver)
#   LLM_FINETUNE_NIXOS_DRIVER_DIR     the NixOS driver directory (default /run/opengl-driver/lib)
llm_finetune_host_driver() {
  local nixos_dir="${LLM_FINETUNE_NIXOS_DRIVER_DIR:-/run/opengl-driver/lib}"
  local search="${LLM_FINETUNE_DRIVER_SEARCH_PATH:-/usr/lib/aarch64-linux-gnu:/usr/lib/x86_64-linux-gnu:/usr/lib64:/usr/lib:/usr/lib/wsl/lib}"
  local link_dir="${LLM_FINETUNE_DRIVER_LINK_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/llm-finetune/host-driver}"
  local dir found="" lib
  local -a dirs

  if [ -n "${LLM_FINETUNE_NO_HOST_DRIVER:-}" ]; then
    return 0
  fi
  if [ -e "$nixos_dir/libcuda.so.1" ]; then
    export TRITON_LIBCUDA_PATH="${TRITON_LIBCUDA_PATH:-$nixos_dir}"
    return 0
  fi
  IFS=: read -r -a dirs <<<"$search"
  for dir in "${dirs[@]}"; do
    if [ -n "$dir" ] && [ -e "$dir/libcuda.so.1" ]; then
      found="$dir"
      break
    fi
  done
  if [ -z "$found" ]; then
    echo "note: no NVIDIA driver found in $nixos_dir or $search; torch will run on the CPU." >&2
    echo "      Set LLM_FINETUNE_DRIVER_SEARCH_PATH to the directory holding libcuda.so.1." >&2
    return 0
  fi
  if ! mkdir -p "$link_dir"; then
    echo "note: cannot create $link_dir; the host NVIDIA driver is not linked in." >&2
    return 0
  fi
  find "$link_dir" -maxdepth 1 -type l -delete
  # libdxcore: WSL's libcuda (in /usr/lib/wsl/lib) talks to the Windows driver through it.
  for lib in "$found"/libcuda.so* "$found"/libcudadebugger.so* "$found"/libnvidia-*.so* "$found"/libnvcuvid.so* "$found"/libdxcore.so*; do
    if [ -e "$lib" ]; then
      ln -sf "$lib" "$link_dir/"
    fi
  done
  export LLM_FINETUNE_HOST_DRIVER_DIR="$found"
  export TRITON_LIBCUDA_PATH="${TRITON_LIBCUDA_PATH:-$link_dir}"
  export LD_LIBRARY_PATH="$link_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  return 0
}
llm_finetune_host_driver
