// Usage: dotnet fsi patch-glibcxx.fsx [--always] DIR...   (run by MoeToolkit.targets after the copy to bin/ or
// to the publish folder). Without --always, only on hosts whose libstdc++ lacks GLIBCXX_3.4.32.
#load "GlibcxxPatch.fs"
open GlibcxxPatch

let args = fsi.CommandLineArgs |> Array.skip 1
let always = args |> Array.contains "--always"
for dir in args |> Array.filter ((<>) "--always") do
    for path, outcome in (if always then patchTreeAlways dir else patchTree dir) do
        printfn "glibcxx-patch: %A %s" outcome path
