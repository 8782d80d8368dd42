/// Headless Chromium: finding it on PATH, running it with the flags a sandbox-free server needs, and
/// taking a PNG screenshot of a page, checked by reading the PNG's header. Figures (`Plots.writeFigure`)
/// and the tests that check a report is drawn share this one copy.
/// Axes: W width and H height in CSS pixels (one CSS pixel = one PNG pixel at the default scale factor).
module Moe.Browser

open System
open System.Diagnostics
open System.IO
open System.Text

/// Executable names tried in order: Debian's package, Ubuntu's, Google's build.
let names = [ "chromium"; "chromium-browser"; "google-chrome" ]

/// Chromium's limits: starting and drawing ~20 charts takes a few seconds on 2 cores.
let timeout = TimeSpan.FromSeconds 45.0

/// Milliseconds of virtual time the page gets to run its scripts (plotly.js drawing) before the DOM is read
/// or the screenshot taken.
let virtualTimeBudgetMs = 10000

/// Flags of every run: no sandbox (containers run as root), no GPU and no network (pages are
/// self-contained), no scroll bars in screenshots.
let commonArgs =
    [ "--headless"; "--no-sandbox"; "--disable-gpu"; "--disable-background-networking"; "--disable-extensions"
      "--hide-scrollbars"; sprintf "--virtual-time-budget=%d" virtualTimeBudgetMs ]

/// The first of `names` found in the folders of a PATH-style string (':'-separated), as a full path.
let findIn (searchPath: string) : string option =
    if String.IsNullOrEmpty searchPath then None
    else
        let dirs = searchPath.Split(':', StringSplitOptions.RemoveEmptyEntries)
        names |> List.tryPick (fun name -> dirs |> Array.map (fun d -> Path.Combine(d, name)) |> Array.tryFind File.Exists)

/// The first of `names` on this process's PATH. (The one place outside the CLI that reads the environment:
/// the executable is looked up the way a shell would.)
let find () : string option = findIn (Environment.GetEnvironmentVariable "PATH")

/// The line a caller prints when there is no Chromium.
let notFound = sprintf "no Chromium found on PATH (one of %s; Debian: apt-get install chromium)" (String.Join(", ", names))

/// Runs `exe` with `commonArgs` and then `args`; Ok its standard output, or Error with the exit code and
/// standard error, or the timeout.
let run (exe: string) (args: string list) : Result<string, string> =
    let psi = ProcessStartInfo(exe, RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false)
    for a in commonArgs @ args do psi.ArgumentList.Add a
    use p = Process.Start psi
    let out = p.StandardOutput.ReadToEndAsync()
    let err = p.StandardError.ReadToEndAsync()
    if not (p.WaitForExit(int timeout.TotalMilliseconds)) then
        p.Kill true
        Error(sprintf "%s did not finish within %O" exe timeout)
    elif p.ExitCode <> 0 then Error(sprintf "%s exited with %d: %s" exe p.ExitCode err.Result)
    else Ok out.Result

/// The PNG file signature (PNG spec sec. 5.2).
let pngSignature = [| 0x89uy; 0x50uy; 0x4Euy; 0x47uy; 0x0Duy; 0x0Auy; 0x1Auy; 0x0Auy |]

/// Width and height of a PNG from its IHDR chunk, which the spec puts first, right after the signature
/// (PNG spec sec. 5.6 and 11.2.2: 4-byte length, "IHDR", 4-byte big-endian width, then height); Error names
/// what was wrong.
let pngSize (path: string) : Result<int * int, string> =
    if not (File.Exists path) then Error(sprintf "expected a PNG at %s, found no file" path)
    else
        let bytes = File.ReadAllBytes path
        let bigEndian (at: int) = (int bytes[at] <<< 24) ||| (int bytes[at + 1] <<< 16) ||| (int bytes[at + 2] <<< 8) ||| int bytes[at + 3]
        // Signature, chunk length, chunk type, width, height.
        let headerEnd = 8 + 4 + 4 + 4 + 4
        if bytes.Length < headerEnd then Error(sprintf "expected a PNG at %s, got %d bytes" path bytes.Length)
        elif bytes[0..7] <> pngSignature then Error(sprintf "expected the PNG signature at the start of %s" path)
        elif Encoding.ASCII.GetString(bytes, 12, 4) <> "IHDR" then Error(sprintf "expected the IHDR chunk first in %s" path)
        else Ok(bigEndian 16, bigEndian 20)

/// Draws the page at `page` (a file) in a window of `width` x `height` and writes the screenshot to `png`;
/// Ok the PNG's full path once its header says it is a PNG of that size, else Error saying what failed.
let screenshot (exe: string) (page: string) (png: string) (width: int) (height: int) : Result<string, string> =
    if width < 1 || height < 1 then invalidArg "width" (sprintf "expected a window of at least 1 x 1 pixels, got %d x %d" width height)
    let full = Path.GetFullPath png
    Directory.CreateDirectory(Path.GetDirectoryName full) |> ignore
    if File.Exists full then File.Delete full
    run exe [ sprintf "--screenshot=%s" full; sprintf "--window-size=%d,%d" width height; Uri(Path.GetFullPath page).AbsoluteUri ]
    |> Result.bind (fun _ -> pngSize full)
    |> Result.bind (fun (w, h) ->
        if w = width && h = height then Ok full
        else Error(sprintf "expected a %d x %d screenshot in %s, got %d x %d" width height full w h))
