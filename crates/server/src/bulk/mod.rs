//! `qwen-ocr extract`: every image and PDF page of files and folders through the model, into a
//! JSON Lines file, with progress, and resumable. The work goes through `/v1/extract` of a
//! server started inside this process (one engine, batching up to `--concurrency` pages), or of
//! `--server`: the same requests and the same lines either way.

mod client;
mod inputs;
mod journal;
mod progress;

pub use journal::{Line, Status};

use std::io::Read;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Condvar, Mutex};

use anyhow::{Context, Result};
use clap::Args;

use self::client::Client;
use self::journal::Journal;
use self::progress::Progress;
use crate::cli::ModelArgs;
use crate::config::{AdapterConfig, ServerConfig};
use crate::documents::isolated::Renderer;
use crate::documents::pages::PageSelection;
use crate::documents::pdf::is_pdf;

/// Pages of one PDF sent in one request: enough to batch, few enough for any server's
/// `max_pdf_pages`, and a stopped run loses little.
const PAGES_PER_REQUEST: usize = 8;
/// The adapter's name on the local server.
const LOCAL_ADAPTER: &str = "bulk";

#[derive(Args, Debug)]
pub struct ExtractArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A PEFT LoRA adapter folder; with --server, the name of an adapter that server serves.
    #[arg(long)]
    adapter: Option<String>,
    /// A JSON Schema file that every answer is constrained to.
    #[arg(long)]
    schema: Option<PathBuf>,
    /// The instruction (default: the server's extraction prompt).
    #[arg(long)]
    prompt: Option<String>,
    /// The pages to read of each PDF, e.g. `1-3,7` or `2-` (default: all).
    #[arg(long)]
    pages: Option<PageSelection>,
    /// Most tokens to generate per image or page (default: the server's).
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Fewest pixels an image or page may have once resized.
    #[arg(long)]
    min_pixels: Option<u64>,
    /// Most pixels an image or page may have once resized (PDF pages are rendered to it).
    #[arg(long)]
    max_pixels: Option<u64>,
    /// Images and pages in flight at once: the local engine's batch size.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// The results, one JSON line per image or page; the same file again resumes the run.
    #[arg(long)]
    out: PathBuf,
    /// Send the work to this running server or gateway (`http://host:port`) instead of loading
    /// the model here (then --model and its options are not used).
    #[arg(long)]
    server: Option<String>,
    /// The key for --server.
    #[arg(long, env = "QWEN_OCR_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Images, PDFs, and folders holding them (searched recursively).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
}

/// One request's worth of work, or a file that failed before any.
enum Job {
    Image {
        file: String,
        path: PathBuf,
    },
    /// Read again when its turn comes: the scan runs ahead, and must not hold every PDF.
    Pages {
        file: String,
        path: PathBuf,
        pages: Vec<u32>,
    },
    Failed(Box<Line>),
}

pub fn run(args: ExtractArgs) -> Result<()> {
    anyhow::ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    let mut fields = Vec::new();
    if let Some(path) = &args.schema {
        let schema = std::fs::read_to_string(path).with_context(|| format!("reading --schema {}", path.display()))?;
        serde_json::from_str::<serde_json::Value>(&schema).with_context(|| format!("--schema {} is not JSON", path.display()))?;
        fields.push(("schema", schema));
    }
    if let Some(prompt) = &args.prompt {
        fields.push(("prompt", prompt.clone()));
    }
    fields.extend(args.max_tokens.map(|n| ("max_tokens", n.to_string())));
    fields.extend(args.min_pixels.map(|n| ("min_pixels", n.to_string())));
    fields.extend(args.max_pixels.map(|n| ("max_pixels", n.to_string())));
    let files = inputs::collect(&args.inputs)?;
    anyhow::ensure!(
        !files.is_empty(),
        "no images or PDFs found in {}",
        args.inputs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    );
    let journal = Journal::open(&args.out)?;

    let (client, _local) = match &args.server {
        Some(url) => {
            let client = Client {
                base: url.trim_end_matches('/').to_string(),
                api_key: args.api_key.clone(),
                adapter: args.adapter.clone(),
                fields,
            };
            (client, None)
        }
        None => {
            let local = crate::serve::Background::start(local_config(&args)?)?.wait_ready()?;
            let adapter = args.adapter.as_ref().map(|_| LOCAL_ADAPTER.to_string());
            (Client { base: local.base.clone(), api_key: None, adapter, fields }, Some(local))
        }
    };
    // Page counts come from the same renderer the server uses, in a child process of its own.
    let renderer = Renderer::current(ServerConfig::default().render_limits())?;
    let progress = Progress::new();
    let (jobs_tx, jobs) = mpsc::channel();
    let slots = Slots::new(args.concurrency);
    let skipped = std::thread::scope(|scope| {
        let scanner = {
            // The scan owns the sender: the jobs end when it does.
            let (files, pages, journal, renderer, progress) = (&files, args.pages.as_ref(), &journal, &renderer, &progress);
            scope.spawn(move || scan(files, pages, journal, renderer, progress, &jobs_tx))
        };
        for job in jobs.iter() {
            let weight = match &job {
                Job::Pages { pages, .. } => pages.len(),
                _ => 1,
            };
            slots.acquire(weight);
            let (client, journal, progress, slots) = (&client, &journal, &progress, &slots);
            scope.spawn(move || {
                run_job(job, client, &mut |line| {
                    if let Err(e) = journal.write(&line) {
                        eprintln!("error: cannot write to the results file: {e:#}");
                        std::process::exit(1);
                    }
                    progress.finished(&line);
                });
                slots.release(weight);
            });
        }
        scanner.join().expect("the scan does not panic")
    });
    progress.finish();
    let (ok, failed) = (progress.ok.load(Ordering::Relaxed), progress.failed.load(Ordering::Relaxed));
    eprintln!("{ok} ok, {failed} failed, {skipped} already done before: {}", args.out.display());
    if ok == 0 && skipped == 0 && failed > 0 {
        anyhow::bail!("nothing could be processed: {failed} failed (their reasons are in {})", args.out.display());
    }
    Ok(())
}

/// Turns the files into jobs, skipping what earlier runs finished; returns how many images and
/// pages were skipped.
fn scan(
    files: &[PathBuf],
    pages: Option<&PageSelection>,
    journal: &Journal,
    renderer: &Renderer,
    progress: &Progress,
    jobs: &mpsc::Sender<Job>,
) -> u64 {
    let mut skipped = 0;
    for path in files {
        let file = path.display().to_string();
        let found = match read_if_pdf(path) {
            Err(e) => vec![Job::Failed(Box::new(Line::failed(&file, None, format!("cannot read it: {e}"))))],
            Ok(None) if journal.is_done(&file, None) => {
                skipped += 1;
                Vec::new()
            }
            Ok(None) => vec![Job::Image { file, path: path.clone() }],
            Ok(Some(bytes)) => {
                let (jobs, done) = pdf_jobs(&file, path, bytes, pages, journal, renderer);
                skipped += done;
                jobs
            }
        };
        for job in found {
            let items = match &job {
                Job::Pages { pages, .. } => pages.len(),
                _ => 1,
            };
            progress.add(items as u64);
            if jobs.send(job).is_err() {
                return skipped;
            }
        }
    }
    skipped
}

/// A PDF's pages not yet done, a request's worth at a time, or why it cannot be read; and how
/// many pages earlier runs did.
fn pdf_jobs(
    file: &str,
    path: &Path,
    bytes: Arc<[u8]>,
    selection: Option<&PageSelection>,
    journal: &Journal,
    renderer: &Renderer,
) -> (Vec<Job>, u64) {
    let count = match renderer.count_pages(bytes) {
        Ok(count) => count,
        Err(e) => return (vec![Job::Failed(Box::new(Line::failed(file, None, e.to_string())))], 0),
    };
    let pages = match selection.map_or_else(|| Ok((1..=count).collect()), |s| s.resolve(count)) {
        Ok(pages) => pages,
        Err(e) => return (vec![Job::Failed(Box::new(Line::failed(file, None, e)))], 0),
    };
    let (done, left): (Vec<u32>, Vec<u32>) = pages.into_iter().partition(|&p| journal.is_done(file, Some(p)));
    let jobs =
        left.chunks(PAGES_PER_REQUEST).map(|chunk| Job::Pages { file: file.to_string(), path: path.to_path_buf(), pages: chunk.to_vec() });
    (jobs.collect(), done.len() as u64)
}

/// The whole file when it is a PDF, `None` for anything else (an image, or not).
fn read_if_pdf(path: &Path) -> std::io::Result<Option<Arc<[u8]>>> {
    let mut head = Vec::new();
    std::fs::File::open(path)?.take(1024).read_to_end(&mut head)?;
    if !is_pdf(&head) {
        return Ok(None);
    }
    Ok(Some(std::fs::read(path)?.into()))
}

fn run_job(job: Job, client: &Client, done: &mut dyn FnMut(Line)) {
    match job {
        Job::Failed(line) => done(*line),
        Job::Image { file, path } => match std::fs::read(&path) {
            Ok(bytes) => done(client.image(&file, &bytes)),
            Err(e) => done(Line::failed(&file, None, format!("cannot read it: {e}"))),
        },
        Job::Pages { file, path, pages } => match std::fs::read(&path) {
            Ok(bytes) => client.pages(&file, &bytes, &pages, done),
            Err(e) => pages.iter().for_each(|&page| done(Line::failed(&file, Some(page), format!("cannot read it: {e}")))),
        },
    }
}

/// The server inside this process: loopback only, limits sized for local files, an engine batch
/// of `--concurrency`.
fn local_config(args: &ExtractArgs) -> Result<ServerConfig> {
    let mut config = ServerConfig::default();
    let model = &args.model;
    (config.model, config.dtype, config.quant, config.quant_cache, config.device) =
        (model.model.clone(), model.dtype, model.quant, model.quant_cache.clone(), model.device);
    config.load_options()?;
    config.host = Ipv4Addr::LOCALHOST.into();
    config.port = 0;
    config.replica_id = Some("local".into());
    // The files are ours and read whole anyway; a run may take days.
    config.max_body_bytes = 1 << 30;
    config.request_timeout_secs = 30 * 24 * 3600;
    config.read_timeout_secs = 3600;
    config.max_pdf_pages = PAGES_PER_REQUEST;
    config.engine.max_batch_size = args.concurrency;
    config.engine.max_queue = config.engine.max_queue.max(args.concurrency * 2);
    if let Some(adapter) = &args.adapter {
        config.adapters.insert(LOCAL_ADAPTER.into(), AdapterConfig::at(PathBuf::from(adapter)));
    }
    Ok(config)
}

/// Pages in flight: a job takes as many as it has pages (at most all of them).
struct Slots {
    capacity: usize,
    free: Mutex<usize>,
    freed: Condvar,
}

impl Slots {
    fn new(capacity: usize) -> Self {
        Self { capacity, free: Mutex::new(capacity), freed: Condvar::new() }
    }

    fn acquire(&self, n: usize) {
        let n = n.min(self.capacity);
        let mut free = self.freed.wait_while(self.free.lock().expect("slots lock"), |free| *free < n).expect("slots lock");
        *free -= n;
    }

    fn release(&self, n: usize) {
        *self.free.lock().expect("slots lock") += n.min(self.capacity);
        self.freed.notify_all();
    }
}
