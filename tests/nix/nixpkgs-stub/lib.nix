# The subset of nixpkgs' lib that this repository's Nix code uses, with the same semantics.
let
  lib = builtins // rec {
    id = x: x;
    fix =
      f:
      let
        x = f x;
      in
      x;
    extends =
      overlay: f: final:
      let
        prev = f final;
      in
      prev // overlay final prev;
    composeExtensions =
      f: g: final: prev:
      let
        fApplied = f final prev;
        prev' = prev // fApplied;
      in
      fApplied // g final prev';
    composeManyExtensions = builtins.foldl' (acc: f: composeExtensions acc f) (final: prev: { });

    genAttrs = names: f: builtins.listToAttrs (map (n: nameValuePair n (f n)) names);
    nameValuePair = name: value: { inherit name value; };
    mapAttrs' = f: set: builtins.listToAttrs (map (n: f n set.${n}) (builtins.attrNames set));
    filterAttrs =
      pred: set:
      builtins.listToAttrs (
        builtins.concatMap (
          n: if pred n set.${n} then [ (nameValuePair n set.${n}) ] else [ ]
        ) (builtins.attrNames set)
      );
    optional = cond: x: if cond then [ x ] else [ ];
    optionals = cond: xs: if cond then xs else [ ];
    optionalString = cond: s: if cond then s else "";
    optionalAttrs = cond: set: if cond then set else { };
    concatMapStringsSep = sep: f: list: builtins.concatStringsSep sep (map f list);
    hasPrefix = prefix: s: builtins.substring 0 (builtins.stringLength prefix) s == prefix;
    hasSuffix =
      suffix: s:
      let
        ls = builtins.stringLength s;
        lx = builtins.stringLength suffix;
      in
      ls >= lx && builtins.substring (ls - lx) lx s == suffix;
    toLower =
      builtins.replaceStrings
        (builtins.genList (i: builtins.substring i 1 "ABCDEFGHIJKLMNOPQRSTUVWXYZ") 26)
        (builtins.genList (i: builtins.substring i 1 "abcdefghijklmnopqrstuvwxyz") 26);
    versionAtLeast = a: b: builtins.compareVersions a b >= 0;
    versionOlder = a: b: builtins.compareVersions a b < 0;
    isDerivation = x: builtins.isAttrs x && (x.type or null) == "derivation";
    escapeShellArg = s: "'" + builtins.replaceStrings [ "'" ] [ "'\\''" ] (toString s) + "'";
    escapeShellArgs = args: builtins.concatStringsSep " " (map escapeShellArg args);
    makeBinPath = drvs: builtins.concatStringsSep ":" (map (d: "${getBin d}/bin") drvs);
    cmakeFeature = name: value: "-D${name}:STRING=${value}";
    getOutput = output: drv: drv.${output} or drv.out or drv;
    getBin = getOutput "bin";
    getName = drv: drv.pname or (builtins.parseDrvName drv.name).name;
    getExe =
      drv:
      "${getBin drv}/bin/${
        drv.meta.mainProgram or (throw "lib.getExe: ${drv.name} has no meta.mainProgram")
      }";
    getExe' = drv: name: "${getBin drv}/bin/${name}";

    # lib.fileset: a file set is a list of paths; toSource copies exactly those into the store
    # (like the real one, a missing path is an error).
    fileset = {
      unions =
        filesets:
        builtins.concatMap (
          f:
          if builtins.isList f then
            f
          else if builtins.pathExists f then
            [ f ]
          else
            throw "lib.fileset.unions: ${toString f} does not exist"
        ) filesets;
      toSource =
        { root, fileset }:
        let
          wanted = map toString (if builtins.isList fileset then fileset else [ fileset ]);
          rootString = toString root;
        in
        assert builtins.all (
          p: hasPrefix (rootString + "/") p || p == rootString
        ) wanted || throw "lib.fileset.toSource: a file is outside root ${rootString}";
        builtins.path {
          name = "source";
          path = root;
          filter =
            path: type:
            builtins.any (
              p:
              path == p
              || hasPrefix (p + "/") path
              || (type == "directory" && hasPrefix (path + "/") p)
            ) wanted;
        };
    };
  };
in
lib
