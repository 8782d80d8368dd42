/// Strict UTF-8 reading and the text clean-ups every loader applies, and `DataException`, the error every
/// loader raises for bad input (it names the file and, where known, the line).
module Moe.TextTools

open System
open System.Collections.Generic
open System.IO
open System.Text
open System.Text.Unicode

/// Bad input: the message names the file and, where known, the line (1-based) or item.
type DataException(message: string, file: string, line: int64 option) =
    inherit Exception(message)
    /// The file the problem is in.
    member _.File = file
    /// The line (or row, or item) the problem is at, when known.
    member _.Line = line

let internal fail (file: string) (line: int64 option) (what: string) : 'a =
    let where =
        match line with
        | Some l -> sprintf "%s:%d" file l
        | None -> file
    raise (DataException(sprintf "%s: %s" where what, file, line))

let private bom = [| 0xEFuy; 0xBBuy; 0xBFuy |]
/// Bytes read per system call by `readLines`.
let private readBuffer = 1 <<< 16

/// Decodes `bytes` as strict UTF-8, or fails naming the file, line and byte column of the first bad byte.
let decodeStrict (file: string) (line: int64) (bytes: ReadOnlySpan<byte>) : string =
    let chars = Array.zeroCreate<char> bytes.Length
    let mutable read = 0
    let mutable written = 0
    let status = Utf8.ToUtf16(bytes, Span<char>(chars), &read, &written, false, true)
    if status <> Buffers.OperationStatus.Done then
        let bad = bytes.Slice(read, min 4 (bytes.Length - read)).ToArray() |> Array.map (sprintf "0x%02X") |> String.concat " "
        fail file (Some line) (sprintf "invalid UTF-8 at byte %d of the line (%s); expected UTF-8 text" (read + 1) bad)
    String(chars, 0, written)

// One line's bytes (without its \n) to text: BOM dropped on line 1, a trailing \r dropped.
let private lineText (file: string) (lineNo: int64) (bytes: byte[]) (offset: int) (count: int) : string =
    let mutable start = offset
    let mutable n = count
    if lineNo = 1L && n >= 3 && bytes[start] = bom[0] && bytes[start + 1] = bom[1] && bytes[start + 2] = bom[2] then
        start <- start + 3
        n <- n - 3
    if n > 0 && bytes[start + n - 1] = 13uy then n <- n - 1
    decodeStrict file lineNo (ReadOnlySpan<byte>(bytes, start, n))

/// The lines of a UTF-8 file with their 1-based numbers, read lazily and decoded strictly. Splits on
/// `\n` and keeps a last line that has no newline; a final `\n` does not start an empty line. A
/// trailing `\r` is removed (CRLF files), and so is a byte-order mark.
let readLines (path: string) : seq<int64 * string> =
    seq {
        if not (File.Exists path) then fail path None "file not found"
        use stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, readBuffer, FileOptions.SequentialScan)
        let buffer = Array.zeroCreate<byte> readBuffer
        let pending = new MemoryStream()
        let mutable lineNo = 0L
        let mutable n = stream.Read(buffer, 0, buffer.Length)
        while n > 0 do
            let mutable start = 0
            let mutable nl = Array.IndexOf(buffer, 10uy, start, n - start)
            while nl >= 0 do
                lineNo <- lineNo + 1L
                let line =
                    if pending.Length = 0L then lineText path lineNo buffer start (nl - start)
                    else
                        pending.Write(buffer, start, nl - start)
                        let l = lineText path lineNo (pending.GetBuffer()) 0 (int pending.Length)
                        pending.SetLength 0L
                        l
                yield lineNo, line
                start <- nl + 1
                nl <- if start < n then Array.IndexOf(buffer, 10uy, start, n - start) else -1
            pending.Write(buffer, start, n - start)
            n <- stream.Read(buffer, 0, buffer.Length)
        if pending.Length > 0L then
            lineNo <- lineNo + 1L
            yield lineNo, lineText path lineNo (pending.GetBuffer()) 0 (int pending.Length)
    }

/// Checks a whole file is UTF-8, failing at the first bad line.
let checkUtf8 (path: string) : unit = readLines path |> Seq.iter ignore

/// `\r\n` and lone `\r` become `\n`.
let normaliseNewlines (s: string) : string =
    if s.IndexOf '\r' < 0 then s else s.Replace("\r\n", "\n").Replace('\r', '\n')

// Windows-1252 bytes 0x80-0x9F as the characters a mis-decoding produced.
let private cp1252High =
    [| '\u20AC'; '\u0081'; '\u201A'; '\u0192'; '\u201E'; '\u2026'; '\u2020'; '\u2021'
       '\u02C6'; '\u2030'; '\u0160'; '\u2039'; '\u0152'; '\u008D'; '\u017D'; '\u008F'
       '\u0090'; '\u2018'; '\u2019'; '\u201C'; '\u201D'; '\u2022'; '\u2013'; '\u2014'
       '\u02DC'; '\u2122'; '\u0161'; '\u203A'; '\u0153'; '\u009D'; '\u017E'; '\u0178' |]

let private cp1252Byte (c: char) : int =
    if c >= '\u00A0' && c <= '\u00FF' then int c
    else
        let i = Array.IndexOf(cp1252High, c)
        if i >= 0 then 0x80 + i elif c >= '\u0080' && c <= '\u009F' then int c else -1

/// Undoes UTF-8 text decoded as Windows-1252/Latin-1 (`Â£` -> `£`, `â€™` -> `’`): a lead-byte
/// character followed by continuation-byte characters that together form valid UTF-8. Returns the
/// text and whether anything changed.
let repairMojibake (s: string) : string * bool =
    let isLead (c: char) = c >= '\u00C2' && c <= '\u00F4'
    if not (s |> Seq.exists isLead) then s, false
    else
        let out = StringBuilder(s.Length)
        let mutable changed = false
        let mutable i = 0
        let strict = UTF8Encoding(false, true)
        while i < s.Length do
            let c = s[i]
            let need = if c >= '\u00C2' && c <= '\u00DF' then 1 elif c >= '\u00E0' && c <= '\u00EF' then 2 elif c >= '\u00F0' && c <= '\u00F4' then 3 else 0
            let mutable repaired = false
            if need > 0 && i + need < s.Length then
                let bytes = Array.zeroCreate<byte> (need + 1)
                bytes[0] <- byte c
                let mutable ok = true
                for k in 1 .. need do
                    let b = cp1252Byte s[i + k]
                    if b < 0x80 || b > 0xBF then ok <- false else bytes[k] <- byte b
                if ok then
                    try
                        out.Append(strict.GetString bytes) |> ignore
                        i <- i + need + 1
                        repaired <- true
                        changed <- true
                    with :? DecoderFallbackException -> ()
            if not repaired then
                out.Append c |> ignore
                i <- i + 1
        out.ToString(), changed

/// `<t> s1 </t> <t> s2 </t>` -> `s1\ns2`; None when the text has no such tags.
let stripSentenceTags (s: string) : string option =
    if s.Contains "<t>" && s.Contains "</t>" then
        let parts =
            s.Split([| "<t>"; "</t>" |], StringSplitOptions.RemoveEmptyEntries ||| StringSplitOptions.TrimEntries)
        Some(String.Join("\n", parts))
    else None

/// Cuts `s` to at most `maxChars`, at the last whitespace in the second half when there is one, never
/// inside a surrogate pair.
let truncate (maxChars: int) (s: string) : string =
    if s.Length <= maxChars then s
    else
        let mutable cut = maxChars
        if Char.IsLowSurrogate s[cut] then cut <- cut - 1
        let space = s.LastIndexOfAny([| ' '; '\n'; '\t' |], cut - 1, cut - maxChars / 2)
        (if space > 0 then s.Substring(0, space) else s.Substring(0, cut)).TrimEnd()

/// Whitespace-separated words.
let words (s: string) : int =
    s.Split((null: char[]), StringSplitOptions.RemoveEmptyEntries).Length
