//! The files a bulk run reads: each INPUT as given, or the images and PDFs in a folder and its
//! subfolders, in a stable order.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// What a folder is searched for (a file named on the command line is taken whatever it is).
const EXTENSIONS: [&str; 10] = ["pdf", "png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff", "jfif"];

/// Every file to read: named files as they are, folders searched recursively (sorted, and
/// without following links to folders, which could loop).
pub fn collect(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for input in inputs {
        let meta = std::fs::metadata(input).with_context(|| format!("{}", input.display()))?;
        if meta.is_dir() {
            let mut found = Vec::new();
            walk(input, &mut found).with_context(|| format!("reading the folder {}", input.display()))?;
            found.sort();
            files.extend(found);
        } else {
            files.push(input.clone());
        }
    }
    Ok(files)
}

fn walk(dir: &Path, found: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_dir() {
            walk(&path, found)?;
        } else if (kind.is_file() || kind.is_symlink() && path.is_file()) && wanted(&path) {
            found.push(path);
        }
    }
    Ok(())
}

fn wanted(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_are_searched_recursively_for_images_and_pdfs() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("b/c")).unwrap();
        for name in ["a.PNG", "b/c/d.pdf", "b/notes.txt", "b/e.jpg", "results.jsonl"] {
            std::fs::write(root.join(name), b"x").unwrap();
        }
        let named = root.join("b/notes.txt");
        let files = collect(&[root.to_path_buf(), named.clone()]).unwrap();
        let rel: Vec<_> = files.iter().map(|f| f.strip_prefix(root).unwrap().display().to_string()).collect();
        assert_eq!(rel, ["a.PNG", "b/c/d.pdf", "b/e.jpg", "b/notes.txt"]);
        assert!(collect(&[root.join("missing")]).is_err());
    }
}
