// Usage: dotnet fsi build/patch-glibcxx.fsx DIR...   (run by Directory.Build.targets after copy)
#load "GlibcxxPatch.fs"
open GlibcxxPatch

for dir in fsi.CommandLineArgs |> Array.skip 1 do
    for path, outcome in patchTree dir do
        printfn "glibcxx-patch: %A %s" outcome path
