# `llamafactory-init [DIR]`: copies LLaMA-Factory's data/ and examples/ (from the pinned release
# source) into DIR, default the current directory, writable, so that NVIDIA's commands
# (`llamafactory-cli train examples/train_lora/qwen3_lora_sft.yaml`, with `dataset_dir: data`) run
# as written there. An existing data/ or examples/ is left as it is.
{
  writeShellApplication,
  coreutils,
  source,
  version,
}:
writeShellApplication {
  name = "llamafactory-init";
  runtimeInputs = [ coreutils ];
  text = ''
    dest="''${1:-.}"
    mkdir -p "$dest"
    for dir in data examples; do
      if [ -e "$dest/$dir" ]; then
        echo "llamafactory-init: $dest/$dir exists; left as it is" >&2
      else
        cp -r --no-preserve=mode,ownership "${source}/$dir" "$dest/$dir"
      fi
    done
    echo "LLaMA-Factory ${version}: data/ and examples/ are in $dest"
  '';
}
