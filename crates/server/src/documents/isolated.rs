//! Untrusted PDFs are read in a child process: the server runs its own binary again as
//! `qwen-ocr render-pdf`, which reads the document from stdin, checks it, and writes each
//! selected page's pixels to stdout. The child runs under an address-space limit
//! (`pdf_render_memory_bytes`) and a CPU-time limit, and the parent kills it when a page takes
//! longer than `pdf_page_timeout_secs`. A hostile or broken document so costs at most that, and a
//! crash in the renderer costs the page it happened on (the next pages go to a fresh child),
//! never the server.
//!
//! The child writes one JSON line per [`Frame`]; a rendered page's line is followed by its
//! pixels, `width * height * 3` bytes of RGB.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::pages::PageSelection;
use super::pdf::{Document, DocumentError, RenderedPage};

/// The hidden subcommand the child runs.
pub const SUBCOMMAND: &str = "render-pdf";
/// A frame's JSON line is short; a longer one means the stream is broken.
const MAX_LINE: u64 = 64 << 10;

/// How to start the child and what bounds it.
#[derive(Debug, Clone)]
pub struct Renderer {
    /// The `qwen-ocr` binary.
    pub exe: PathBuf,
    pub limits: RenderLimits,
}

#[derive(Debug, Clone, Copy)]
pub struct RenderLimits {
    /// Wall-clock time one page (or opening the document) may take.
    pub page_timeout: Duration,
    /// The child's address space.
    pub memory_bytes: u64,
}

/// What to render.
#[derive(Debug, Clone)]
pub struct RenderJob {
    /// Without one, every page.
    pub pages: Option<PageSelection>,
    /// Most pages one job may select.
    pub max_pages: usize,
    /// Each page is drawn at the resolution that gives it this many pixels.
    pub max_pixels: u64,
}

/// The document as the child found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocumentInfo {
    pub page_count: u32,
    /// The selected pages, ascending: the order they are rendered in.
    pub pages: Vec<u32>,
}

pub enum PageOutcome {
    Rendered { page: u32, rendered: RenderedPage },
    Failed { page: u32, error: String },
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The document is refused: the caller's fault.
    #[error(transparent)]
    Document(#[from] DocumentError),
    /// The child could not be run: the server's.
    #[error("PDF rendering is unavailable: {0}")]
    Internal(String),
}

/// What the child writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "frame", rename_all = "snake_case")]
enum Frame {
    /// The document opened: first, before any page.
    Document(DocumentInfo),
    /// The document is refused: the only frame.
    Refused {
        error: DocumentError,
    },
    /// A rendered page; its pixels follow.
    Page {
        page: u32,
        width: u32,
        height: u32,
        dpi: f64,
    },
    PageFailed {
        page: u32,
        error: String,
    },
}

impl Frame {
    fn payload_len(&self) -> usize {
        match self {
            Frame::Page { width, height, .. } => *width as usize * *height as usize * 3,
            _ => 0,
        }
    }
}

impl Renderer {
    /// The running binary: `/proc/self/exe` on Linux, which still works after the file was
    /// replaced by an upgrade.
    pub fn current(limits: RenderLimits) -> std::io::Result<Self> {
        let exe = if cfg!(target_os = "linux") { PathBuf::from("/proc/self/exe") } else { std::env::current_exe()? };
        Ok(Self { exe, limits })
    }

    /// Opens and checks the document; the pages are rendered by [`Session::render`].
    pub fn open(&self, pdf: Arc<[u8]>, job: RenderJob) -> Result<Session, RenderError> {
        let mut child = RenderChild::spawn(self, &pdf, &job, job.pages.as_ref(), false)?;
        let info = child.document(self.limits.page_timeout)?;
        Ok(Session { renderer: self.clone(), pdf, job, child: Some(child), info })
    }

    /// The number of pages of a document, checked as [`open`](Self::open) checks it.
    pub fn count_pages(&self, pdf: Arc<[u8]>) -> Result<u32, RenderError> {
        let job = RenderJob { pages: None, max_pages: usize::MAX, max_pixels: 1 };
        let mut child = RenderChild::spawn(self, &pdf, &job, None, true)?;
        Ok(child.document(self.limits.page_timeout)?.page_count)
    }
}

/// An opened document whose pages are still to be rendered. Dropping it stops the child.
pub struct Session {
    renderer: Renderer,
    pdf: Arc<[u8]>,
    job: RenderJob,
    child: Option<RenderChild>,
    info: DocumentInfo,
}

impl Session {
    pub fn info(&self) -> &DocumentInfo {
        &self.info
    }

    /// Renders the selected pages in order and hands each to `each` as it is ready (a page
    /// that fails is handed over with its reason); `Break` stops. Past `deadline` the pages
    /// not yet rendered fail.
    pub fn render(mut self, deadline: Option<Instant>, mut each: impl FnMut(PageOutcome) -> ControlFlow<()>) {
        let page_timeout = self.renderer.limits.page_timeout;
        let mut remaining: VecDeque<u32> = self.info.pages.iter().copied().collect();
        while let Some(&page) = remaining.front() {
            let now = Instant::now();
            let (within, by_deadline) = match deadline {
                Some(d) if d <= now => (Duration::ZERO, true),
                Some(d) if d - now < page_timeout => (d - now, true),
                _ => (page_timeout, false),
            };
            let outcome = if within.is_zero() {
                PageOutcome::Failed {
                    page,
                    error: "the request ran out of time (request_timeout_secs) before this page was rendered".into(),
                }
            } else {
                self.next_page(page, &remaining, within, by_deadline)
            };
            remaining.pop_front();
            if each(outcome).is_break() {
                break;
            }
        }
    }

    /// Page `page` from the running child, starting one for the `remaining` pages if the last
    /// one was stopped.
    fn next_page(&mut self, page: u32, remaining: &VecDeque<u32>, within: Duration, by_deadline: bool) -> PageOutcome {
        if self.child.is_none() {
            let pages = PageSelection::of(&remaining.iter().copied().collect::<Vec<_>>());
            let started = RenderChild::spawn(&self.renderer, &self.pdf, &self.job, Some(&pages), false)
                .and_then(|mut child| child.document(within).map(|_| child));
            match started {
                Ok(child) => self.child = Some(child),
                Err(e) => return PageOutcome::Failed { page, error: e.to_string() },
            }
        }
        let child = self.child.as_mut().expect("a child was just started");
        let failed = |error: String| PageOutcome::Failed { page, error };
        match child.next(within) {
            Next::Frame(Frame::Page { page: p, width, height, dpi }, pixels) if p == page => {
                match RgbImage::from_raw(width, height, pixels) {
                    Some(image) => PageOutcome::Rendered { page, rendered: RenderedPage { image, dpi } },
                    None => failed("the renderer sent a short page".into()),
                }
            }
            Next::Frame(Frame::PageFailed { page: p, error }, _) if p == page => failed(error),
            Next::Frame(other, _) => {
                self.child = None;
                failed(format!("the renderer answered out of order ({other:?})"))
            }
            Next::TimedOut => {
                self.child = None;
                if by_deadline {
                    failed("the request ran out of time (request_timeout_secs) while this page was rendered".into())
                } else {
                    failed(format!("rendering the page took longer than {} s (pdf_page_timeout_secs)", within.as_secs_f64()))
                }
            }
            Next::Ended(why) => {
                self.child = None;
                failed(why)
            }
        }
    }
}

/// A running child and the threads that feed and read it.
struct RenderChild {
    process: Child,
    frames: mpsc::Receiver<(Frame, Vec<u8>)>,
    stderr: Option<JoinHandle<String>>,
    memory_bytes: u64,
}

enum Next {
    Frame(Frame, Vec<u8>),
    TimedOut,
    /// The child ended without the frame; why.
    Ended(String),
}

impl RenderChild {
    fn spawn(
        renderer: &Renderer,
        pdf: &Arc<[u8]>,
        job: &RenderJob,
        pages: Option<&PageSelection>,
        count_only: bool,
    ) -> Result<Self, RenderError> {
        let limits = renderer.limits;
        // A backstop should the parent not be there to kill it: every page at its full time.
        let pages_at_most = if count_only { 0 } else { job.max_pages.min(100_000) as u64 };
        let cpu_seconds = limits.page_timeout.as_secs().max(1).saturating_mul(pages_at_most + 1);
        let mut command = Command::new(&renderer.exe);
        command
            .arg(SUBCOMMAND)
            .args(["--max-pixels", &job.max_pixels.to_string(), "--max-pages", &job.max_pages.to_string()])
            .args(["--memory-bytes", &limits.memory_bytes.to_string(), "--cpu-seconds", &cpu_seconds.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(pages) = pages {
            command.args(["--pages", &pages.to_string()]);
        }
        if count_only {
            command.arg("--count-only");
        }
        let mut process = command.spawn().map_err(|e| RenderError::Internal(format!("cannot start {}: {e}", renderer.exe.display())))?;
        let (mut stdin, stdout, mut stderr) =
            (process.stdin.take().expect("piped"), process.stdout.take().expect("piped"), process.stderr.take().expect("piped"));
        let pdf = pdf.clone();
        // The child reads all its input before it writes: feeding it from its own thread keeps
        // a child that died early (its pipe closed) from blocking anyone.
        std::thread::spawn(move || {
            let _ = stdin.write_all(&pdf);
        });
        let (tx, frames) = mpsc::channel();
        let max_payload = job.max_pixels.saturating_mul(3).saturating_add(1 << 20) as usize;
        std::thread::spawn(move || read_frames(stdout, &tx, max_payload));
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = (&mut stderr).take(MAX_LINE).read_to_string(&mut text);
            text
        });
        Ok(Self { process, frames, stderr: Some(stderr), memory_bytes: limits.memory_bytes })
    }

    /// The first frame: the document opened, or why it is refused.
    fn document(&mut self, within: Duration) -> Result<DocumentInfo, RenderError> {
        match self.next(within) {
            Next::Frame(Frame::Document(info), _) => Ok(info),
            Next::Frame(Frame::Refused { error }, _) => Err(error.into()),
            Next::Frame(other, _) => Err(RenderError::Internal(format!("the renderer answered out of order ({other:?})"))),
            Next::TimedOut => {
                Err(DocumentError::Unreadable(format!("opening it took longer than {} s (pdf_page_timeout_secs)", within.as_secs_f64()))
                    .into())
            }
            Next::Ended(why) => Err(DocumentError::Unreadable(why).into()),
        }
    }

    fn next(&mut self, within: Duration) -> Next {
        match self.frames.recv_timeout(within) {
            Ok((frame, payload)) => Next::Frame(frame, payload),
            Err(mpsc::RecvTimeoutError::Timeout) => Next::TimedOut,
            Err(mpsc::RecvTimeoutError::Disconnected) => Next::Ended(self.why_it_ended()),
        }
    }

    /// Why the child stopped sending: how it exited, and what it said.
    fn why_it_ended(&mut self) -> String {
        let status = self.process.wait();
        let said = self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default();
        if said.contains("memory allocation of") {
            return format!("rendering it needed more memory than pdf_render_memory_bytes ({} MiB)", self.memory_bytes >> 20);
        }
        let last_words = said.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string();
        match status {
            Ok(status) => {
                #[cfg(unix)]
                {
                    use std::os::unix::process::ExitStatusExt;
                    if status.signal() == Some(libc::SIGXCPU) {
                        return "rendering it used up the renderer's CPU time".into();
                    }
                    if let Some(signal) = status.signal() {
                        return format!("the renderer crashed on it (signal {signal}){}", suffix(&last_words));
                    }
                }
                format!("the renderer failed on it ({status}){}", suffix(&last_words))
            }
            Err(e) => format!("the renderer was lost: {e}"),
        }
    }
}

fn suffix(words: &str) -> String {
    if words.is_empty() {
        String::new()
    } else {
        format!(": {words}")
    }
}

impl Drop for RenderChild {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// Frames and their payloads from the child's stdout until it ends or breaks the protocol.
fn read_frames(stdout: ChildStdout, tx: &mpsc::Sender<(Frame, Vec<u8>)>, max_payload: usize) {
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    loop {
        line.clear();
        match (&mut reader).take(MAX_LINE).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let Ok(frame) = serde_json::from_str::<Frame>(&line) else { return };
        let len = frame.payload_len();
        if len > max_payload {
            return;
        }
        let mut payload = vec![0; len];
        if reader.read_exact(&mut payload).is_err() || tx.send((frame, payload)).is_err() {
            return;
        }
    }
}

/// `qwen-ocr render-pdf`: the child's side. Not for people: the server starts it.
#[derive(clap::Args, Debug)]
pub struct ChildArgs {
    /// Each page gets this many pixels.
    #[arg(long)]
    max_pixels: u64,
    /// Most pages to select.
    #[arg(long)]
    max_pages: usize,
    /// Pages to render (default: all).
    #[arg(long)]
    pages: Option<PageSelection>,
    /// Address-space limit of this process.
    #[arg(long)]
    memory_bytes: u64,
    /// CPU-time limit of this process.
    #[arg(long)]
    cpu_seconds: u64,
    /// Check the document and report its pages, without rendering any.
    #[arg(long)]
    count_only: bool,
}

/// Reads the document from stdin and writes the frames to stdout.
pub fn child_main(args: ChildArgs) -> anyhow::Result<()> {
    limit_resources(args.memory_bytes, args.cpu_seconds).context("setting the renderer's limits")?;
    let mut pdf = Vec::new();
    std::io::stdin().lock().read_to_end(&mut pdf).context("reading the document")?;
    let mut out = BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
    let opened = Document::open(pdf).and_then(|document| {
        let pages = if args.count_only { Vec::new() } else { document.select(args.pages.as_ref(), args.max_pages)? };
        Ok((document, pages))
    });
    let (document, pages) = match opened {
        Ok(opened) => opened,
        Err(error) => return write_frame(&mut out, &Frame::Refused { error }, &[]),
    };
    write_frame(&mut out, &Frame::Document(DocumentInfo { page_count: document.page_count(), pages: pages.clone() }), &[])?;
    for page in pages {
        // A panic in the renderer fails its page; the next pages may well render.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| document.render(page, args.max_pixels))) {
            Ok(Ok(rendered)) => {
                let (width, height) = rendered.image.dimensions();
                write_frame(&mut out, &Frame::Page { page, width, height, dpi: rendered.dpi }, rendered.image.as_raw())?
            }
            Ok(Err(error)) => write_frame(&mut out, &Frame::PageFailed { page, error }, &[])?,
            Err(panic) => {
                let why = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
                let error = format!("the renderer failed on this page: {}", why.unwrap_or_else(|| "a panic".into()));
                write_frame(&mut out, &Frame::PageFailed { page, error }, &[])?
            }
        }
    }
    Ok(())
}

fn write_frame(out: &mut impl Write, frame: &Frame, payload: &[u8]) -> anyhow::Result<()> {
    serde_json::to_writer(&mut *out, frame)?;
    out.write_all(b"\n")?;
    out.write_all(payload)?;
    out.flush()?;
    Ok(())
}

#[cfg(unix)]
fn limit_resources(memory_bytes: u64, cpu_seconds: u64) -> std::io::Result<()> {
    for (resource, value) in [(libc::RLIMIT_AS, memory_bytes), (libc::RLIMIT_CPU, cpu_seconds)] {
        let limit = libc::rlimit { rlim_cur: value as libc::rlim_t, rlim_max: value as libc::rlim_t };
        // SAFETY: setrlimit reads the struct, which lives across the call, and changes only this
        // process's limits.
        if unsafe { libc::setrlimit(resource, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Elsewhere only the parent's wall-clock limit holds.
#[cfg(not(unix))]
fn limit_resources(_memory_bytes: u64, _cpu_seconds: u64) -> std::io::Result<()> {
    Ok(())
}
